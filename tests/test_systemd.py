"""The unit files in systemd/: `systemd-analyze verify` passes on every one of them (run for
real: a missing systemd-analyze is installed from Debian's systemd package when we are root,
and fails the suite otherwise), the directives the operations guide promises are there, and the
example environment file names the variables the code reads."""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mesh.coordinator.connect import ENV_COORDINATOR, ENV_STATE_DIR, ETCD_ENV

UNIT_DIR = Path(__file__).resolve().parent.parent / "systemd"
UNIT_SUFFIXES = (".service", ".socket", ".target", ".timer", ".path")
INSTALLED_MESHD = "/opt/chunkmesh/venv/bin/meshd"  # where the units expect meshd (docs/operations.md)
VERIFY_TIMEOUT_S = 60

# Lines systemd-analyze may print about our units that are not problems, each with its reason.
# Everything else it says about our units fails the test (it exits 0 on unknown keys and on
# values it cannot parse, so the exit code alone proves little).
KNOWN_HARMLESS = (
    # verify run by a user without a systemd instance (containers, CI): nothing to check against
    re.compile(r"Failed to (connect to|open) (user|system) (bus|manager)"),
)


def unit_files() -> list[Path]:
    return sorted(p for p in UNIT_DIR.iterdir() if p.suffix in UNIT_SUFFIXES)


def verify_name(unit: Path) -> str:
    """Templates are verified as an instance (`meshd@0.service`): specifiers such as %i
    are only expanded there."""
    return unit.name.replace("@.", "@0.") if "@." in unit.name else unit.name


def ensure_systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, timeout=300)
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "systemd"],
                       check=True, env=env, timeout=600)
        found = shutil.which("systemd-analyze")
    if not found:
        pytest.fail("systemd-analyze is missing: install Debian's systemd package "
                    "(sudo apt-get install systemd) and run again; the unit files are not checked without it")
    return found


@pytest.fixture(scope="module")
def systemd_analyze() -> str:
    return ensure_systemd_analyze()


@pytest.fixture
def unit_copy(tmp_path):
    """Copy units into tmp_path with ExecStart's meshd replaced by an executable that exists."""
    fake = tmp_path / "bin" / "meshd"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)

    def copy(name: str, text: str) -> Path:
        path = tmp_path / "units" / name
        path.parent.mkdir(exist_ok=True)
        path.write_text(text.replace(INSTALLED_MESHD, str(fake)))
        return path
    return copy


def verify(analyze: str, unit: Path) -> tuple[int, list[str]]:
    """Run `systemd-analyze verify` on `unit` (a file, or an instance of a template next to it);
    return its exit code and the lines it printed about our units."""
    target = unit.parent / verify_name(unit)
    proc = subprocess.run([analyze, "verify", "--man=no", str(target)], capture_output=True, text=True,
                          timeout=VERIFY_TIMEOUT_S, cwd=unit.parent)
    ours = (str(unit.parent), unit.name, target.name)
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    about_ours = [line for line in lines if any(name in line for name in ours)]
    return proc.returncode, [line for line in about_ours if not any(p.search(line) for p in KNOWN_HARMLESS)]


def directives(text: str) -> dict[str, list[str]]:
    """'Section.Key' -> every value given (keys may repeat), comments and blank lines skipped."""
    found: dict[str, list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        found.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return found


# -- every unit passes systemd-analyze verify --
def test_there_are_units_to_verify():
    names = [p.name for p in unit_files()]
    assert "meshd.service" in names and "meshd@.service" in names


@pytest.mark.parametrize("unit", unit_files(), ids=lambda p: p.name)
def test_systemd_analyze_verify_passes(systemd_analyze, unit_copy, unit):
    copied = unit_copy(unit.name, unit.read_text())
    rc, problems = verify(systemd_analyze, copied)
    assert (rc, problems) == (0, []), f"systemd-analyze verify {unit.name}: exit {rc}\n" + "\n".join(problems)


# -- the check is not vacuous: broken units fail it --
GOOD = (UNIT_DIR / "meshd.service").read_text()


@pytest.mark.parametrize("broken, reason", [
    (GOOD.replace("[Service]\n", "[Service]\nNoSuchDirective=1\n", 1), "unknown key"),
    (GOOD.replace("Type=notify\n", "Type=notifyy\n", 1), "unparsable value"),
    (GOOD.replace("WatchdogSec=30s\n", "WatchdogSec=thirty\n", 1), "unparsable time"),
])
def test_verify_reports_what_systemd_would_ignore(systemd_analyze, unit_copy, broken, reason):
    assert broken != GOOD
    rc, problems = verify(systemd_analyze, unit_copy("meshd.service", broken))
    assert problems, f"a unit with an {reason} passed the check (rc {rc})"


def test_verify_fails_on_a_missing_executable(systemd_analyze, tmp_path):
    path = tmp_path / "meshd.service"
    path.write_text(GOOD)  # not rewritten: /opt/chunkmesh/venv/bin/meshd is not installed here
    if Path(INSTALLED_MESHD).exists():
        path.write_text(GOOD.replace(INSTALLED_MESHD, str(tmp_path / "no-such-meshd")))
    rc, problems = verify(systemd_analyze, path)
    assert rc != 0 and any("not executable" in line for line in problems), problems


def test_verify_checks_template_instances(systemd_analyze, unit_copy):
    """The template's %i must expand to something systemd parses (a NUMA node number)."""
    template = (UNIT_DIR / "meshd@.service").read_text()
    copied = unit_copy("meshd@.service", template)
    bad_instance = copied.parent / "meshd@x.service"
    proc = subprocess.run([systemd_analyze, "verify", "--man=no", str(bad_instance)], capture_output=True,
                          text=True, timeout=VERIFY_TIMEOUT_S)
    assert "'x'" in proc.stdout + proc.stderr  # AllowedMemoryNodes=x cannot be parsed


# -- what docs/operations.md and the issue promise --
@pytest.mark.parametrize("unit", unit_files(), ids=lambda p: p.name)
def test_units_carry_the_promised_directives(unit):
    d = directives(unit.read_text())
    expected = {
        "Service.Type": ["notify"], "Service.NotifyAccess": ["main"], "Service.WatchdogSec": ["30s"],
        "Service.Restart": ["on-failure"], "Service.RestartSec": ["2s"],
        "Service.ExecReload": ["/bin/kill -HUP $MAINPID"], "Service.KillMode": ["mixed"],
        "Service.TimeoutStopSec": ["60s"], "Service.LimitNOFILE": ["65536"],
        "Service.NoNewPrivileges": ["yes"], "Service.ProtectSystem": ["strict"], "Service.ProtectHome": ["yes"],
        "Service.PrivateTmp": ["yes"], "Service.StateDirectory": ["chunkmesh"],
        "Service.User": ["chunkmesh"], "Service.Group": ["chunkmesh"],
        "Service.ReadWritePaths": ["-/srv/chunkmesh"], "Service.OOMPolicy": ["continue"],
        "Unit.Wants": ["network-online.target"], "Install.WantedBy": ["multi-user.target"],
    }
    for key, values in expected.items():
        assert d.get(key) == values, f"{unit.name}: {key} is {d.get(key)}, expected {values}"
    assert d["Unit.After"] == ["network-online.target etcd.service"]
    assert "-/etc/chunkmesh/meshd.env" in d["Service.EnvironmentFile"]
    assert d["Unit.StartLimitIntervalSec"] and d["Unit.StartLimitBurst"]
    assert "RestartSteps" not in unit.read_text()  # systemd >= 254 only; Debian 12 has 252
    (exec_start,) = d["Service.ExecStart"]
    assert INSTALLED_MESHD in exec_start and "MESHD_ARGS" in exec_start and "--node-id %H" in exec_start


def test_template_exec_start_pins_to_the_numa_node_and_splits_meshd_args(tmp_path):
    """Run the template's ExecStart as systemd would (specifiers expanded, `$$` -> `$`), with a
    stand-in meshd that reports its arguments and CPU affinity."""
    cpulist = Path("/sys/devices/system/node/node0/cpulist")
    assert cpulist.exists(), "this kernel has no NUMA sysfs; the template unit cannot run here"
    (exec_start,) = directives((UNIT_DIR / "meshd@.service").read_text())["Service.ExecStart"]
    fake = tmp_path / "meshd"
    fake.write_text(f"#!{sys.executable}\nimport os, sys, json\n"
                    "print(json.dumps({'argv': sys.argv[1:], 'cpus': sorted(os.sched_getaffinity(0))}))\n")
    fake.chmod(0o755)
    hostname = socket.gethostname()
    line = exec_start.replace("%i", "0").replace("%H", hostname).replace("$$", "$").replace(INSTALLED_MESHD, str(fake))
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "MESHD_ARGS": "--workers 2  --log-level debug"}
    proc = subprocess.run(shlex.split(line), capture_output=True, text=True, env=env, timeout=30)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["argv"] == ["--node-id", f"{hostname}-0", "--workers", "2", "--log-level", "debug"]
    assert report["cpus"] == sorted(parse_cpulist(cpulist.read_text()) & os.sched_getaffinity(0))


def parse_cpulist(text: str) -> set[int]:
    cpus: set[int] = set()
    for part in text.strip().split(","):
        low, _, high = part.partition("-")
        cpus.update(range(int(low), int(high or low) + 1))
    return cpus


# -- the example environment file --
def test_example_env_file_names_the_variables_the_code_reads():
    text = (UNIT_DIR / "chunkmesh.env").read_text()
    mentioned = set(re.findall(r"^#?([A-Z][A-Z0-9_]*)=", text, re.MULTILINE))
    wanted = {ENV_COORDINATOR, ENV_STATE_DIR, "MESHD_ARGS", *ETCD_ENV.values()}
    assert wanted <= mentioned, f"not in systemd/chunkmesh.env: {sorted(wanted - mentioned)}"
    for line in text.splitlines():  # what EnvironmentFile= accepts: KEY=VALUE, comments, blank lines
        if line.strip() and not line.lstrip().startswith("#"):
            assert re.fullmatch(r"[A-Z][A-Z0-9_]*=[^\"'$`]*", line), f"not KEY=VALUE: {line!r}"


def test_units_use_every_systemd_file_shipped():
    """Every file in systemd/ is a unit, the env example, a sysusers/tmpfiles snippet or the README."""
    others = {p.name for p in UNIT_DIR.iterdir()} - {p.name for p in unit_files()}
    assert others <= {"README.md", "chunkmesh.env", "chunkmesh.sysusers.conf", "chunkmesh.tmpfiles.conf"}, others


def test_sysusers_and_tmpfiles_snippets_apply(systemd_analyze, tmp_path):
    """The chunkmesh user, /etc/chunkmesh and /srv/chunkmesh, created in a scratch root."""
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    sysusers = [shutil.which("systemd-sysusers") or "systemd-sysusers", f"--root={root}"]
    if os.geteuid() != 0:
        sysusers.append("--dry-run")
    proc = subprocess.run([*sysusers, str(UNIT_DIR / "chunkmesh.sysusers.conf")], capture_output=True, text=True,
                          timeout=VERIFY_TIMEOUT_S)
    assert proc.returncode == 0 and "Creating user 'chunkmesh'" in proc.stdout + proc.stderr, proc.stderr
    if os.geteuid() != 0:
        return  # chown of the tmpfiles entries needs root; the user part above is checked
    proc = subprocess.run([shutil.which("systemd-tmpfiles") or "systemd-tmpfiles", f"--root={root}", "--create",
                           str(UNIT_DIR / "chunkmesh.tmpfiles.conf")], capture_output=True, text=True,
                          timeout=VERIFY_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr
    assert (root / "etc" / "chunkmesh").is_dir() and (root / "srv" / "chunkmesh").is_dir()
    assert (root / "etc" / "chunkmesh" / "meshd.conf").read_text() == ""  # meshd --config needs it to exist
