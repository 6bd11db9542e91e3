"""scripts/setup's toolchain step, with stand-ins for java, mvn, apt-get and id on a PATH of
their own: as root on Debian/Ubuntu it installs a JRE and Maven with apt-get; elsewhere it says
which are missing and how to install them, and installs nothing. scripts/run-tests stops when
the Pub/Sub emulator is missing (CI fails, not skips)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

from fmnist.testing.processes import ROOT
from fmnist.testing.run import free_port

TOOLS = ("bash", "sed", "head", "grep", "tr", "cat", "dirname", "touch", "chmod")
DEBIAN = 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nID=debian\n'
FEDORA = 'NAME="Fedora Linux"\nID=fedora\n'


def script(path: Path, body: str) -> None:
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def java(bin_dir: Path, major: int) -> None:
    script(bin_dir / "java", f'echo \'openjdk version "{major}.0.2" 2024-01-16\' >&2\n')


def world(tmp_path: Path, uid: int, release: str, java_major: int | None) -> dict[str, str]:
    """A PATH with only the shell tools setup uses, and stand-ins: ``id`` says ``uid``,
    ``apt-get`` records its arguments and "installs" java 17 or mvn into that PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in TOOLS:
        found = shutil.which(tool)
        assert found, tool
        (bin_dir / tool).symlink_to(found)
    script(bin_dir / "id", f"echo {uid}\n")
    if java_major is not None:
        java(bin_dir, java_major)
    log, store = tmp_path / "apt.log", tmp_path / "packages"
    store.mkdir()
    java(store, 17)
    script(store / "mvn", "")
    script(bin_dir / "apt-get", f"""echo "$*" >>{log}
case "$*" in
  *openjdk-17-jre-headless*) cat {store}/java >{bin_dir}/java; chmod +x {bin_dir}/java ;;
  *maven*) cat {store}/mvn >{bin_dir}/mvn; chmod +x {bin_dir}/mvn ;;
esac
""")
    (tmp_path / "os-release").write_text(release)
    return {"PATH": str(bin_dir), "FMNIST_OS_RELEASE": str(tmp_path / "os-release"),
            "HOME": str(tmp_path)}


def kafka_tools(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([shutil.which("bash") or "/bin/bash", "-c",
                           f"source {ROOT / 'scripts' / 'setup'} && kafka_tools && "
                           "command -v mvn && java -version"],
                          env=env, capture_output=True, text=True, timeout=30)


def test_as_root_on_debian_a_missing_jre_and_maven_are_installed(tmp_path: Path) -> None:
    env = world(tmp_path, uid=0, release=DEBIAN, java_major=11)  # too old for Kafka
    done = kafka_tools(env)
    assert done.returncode == 0, done.stdout + done.stderr
    calls = (tmp_path / "apt.log").read_text().splitlines()
    assert [c for c in calls if "install" in c] == [
        "install -y -qq --no-install-recommends openjdk-17-jre-headless",
        "install -y -qq --no-install-recommends maven"]
    assert "installing a Java 17+ runtime" in done.stdout and "installing Maven" in done.stdout
    assert 'version "17.0.2"' in done.stderr  # the java now on PATH


def test_nothing_is_installed_when_java_and_maven_are_there(tmp_path: Path) -> None:
    env = world(tmp_path, uid=0, release=DEBIAN, java_major=21)
    script(Path(env["PATH"]) / "mvn", "")
    done = kafka_tools(env)
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "apt.log").exists()


def test_without_root_it_names_what_is_missing_and_installs_nothing(tmp_path: Path) -> None:
    env = world(tmp_path, uid=1000, release=DEBIAN, java_major=None)
    done = subprocess.run([env["PATH"] + "/bash", "-c",
                           f"source {ROOT / 'scripts' / 'setup'} && kafka_tools"],
                          env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr  # the unit tests need neither
    assert not (tmp_path / "apt.log").exists()
    assert "Kafka needs Java 17 or newer, and `java` is not installed" in done.stderr
    assert "sudo apt-get install openjdk-17-jre-headless" in done.stderr
    assert "sudo apt-get install maven" in done.stderr


def test_as_root_elsewhere_than_debian_it_installs_nothing(tmp_path: Path) -> None:
    env = world(tmp_path, uid=0, release=FEDORA, java_major=11)
    done = subprocess.run([env["PATH"] + "/bash", "-c",
                           f"source {ROOT / 'scripts' / 'setup'} && kafka_tools"],
                          env=env, capture_output=True, text=True, timeout=30)
    assert not (tmp_path / "apt.log").exists()
    assert "`java` is Java 11" in done.stderr


def test_the_test_command_stops_when_the_pubsub_emulator_is_missing(tmp_path: Path) -> None:
    """scripts/run-tests starts the brokers with `scripts/brokers up`, under `set -e`: without
    the emulator that fails (exit 2, saying how to install it) and no test runs."""
    env = {**os.environ, "PUBSUB_SDK_DIRS": str(tmp_path / "no-sdk"),
           "FMNIST_STATE": str(tmp_path / "state"),
           "PUBSUB_HOST_PORT": f"127.0.0.1:{free_port()}"}
    env.pop("PUBSUB_EMULATOR_JAR", None)
    done = subprocess.run([str(ROOT / "scripts" / "brokers"), "up", "pubsub"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "the Pub/Sub emulator is not installed" in done.stderr
    assert "gcloud components install pubsub-emulator" in done.stderr
    run_tests = (ROOT / "scripts" / "run-tests").read_text()
    assert "set -euo pipefail" in run_tests and 'scripts/brokers up "$b"' in run_tests
