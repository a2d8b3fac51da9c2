"""The job: frozen plan, owner state machine, commit policy, output directory, offsets and accounting, the source's planning and the file sink."""
