"""The node: the daemon (meshd), its registry record, config cache, systemd notify and transport security."""
