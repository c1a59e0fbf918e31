"""Fault injection: kills, signals, races and a full disk, each followed by the checks and a rerun.

moeprep runs here as a real process (`python -m moeprep.cli`, its own session, the environment
conftest set up), is hit at a chosen point (a `.partial` appears, the manifest gains a record, the
lock is held, a PUT reaches the local Hub) and then run again. After each fault, and after each
rerun, `problems()` checks the output directory independently of moeprep's own code: the manifest
parses, every file it names hashes (hashlib, here) to the recorded sha256, no final-named GGUF is
on disk that it does not list, the quants chain to the F16 and the F16 to the source, and nothing of
another model is listed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from moeprep.cli import main
from moeprep.records import manifest as mf

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "data" / "recipes" / "tiny-phimoe.yaml"
HUB_SOURCE = "some-org/tiny-phimoe"
MODEL = "tiny-phimoe"
INTERRUPTED = "Interrupted: finished outputs are kept; run the same command again to continue."
LOCK = ".moeprep.lock"
SKIP = "skip (same sha256 on the Hub)"


# --- running moeprep as a process ------------------------------------------------------------------

_LIVE: list[subprocess.Popen] = []  # every process spawned here; whatever still runs is killed at teardown


@dataclass
class Proc:
    """A moeprep process whose stdout and stderr go to files, so they can be read while it runs."""

    popen: subprocess.Popen
    stdout_path: Path
    stderr_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def poll(self) -> int | None:
        return self.popen.poll()

    def wait(self, timeout: float = 240) -> int:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            _kill_group(self.popen)
            raise AssertionError(f"moeprep (pid {self.pid}) still ran after {timeout} s; stderr:\n{self.stderr}") from None

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")


_COUNTER = iter(range(10**6))


def spawn(*args) -> Proc:
    """Start `moeprep ARGS...` in a session of its own, with the test's environment (HF_*, MOEPREP_NO_PROGRESS)."""
    logs = Path(os.environ["HF_HOME"]).parent / "fault-logs"
    logs.mkdir(exist_ok=True)
    n = next(_COUNTER)
    out, err = logs / f"{n}.out", logs / f"{n}.err"
    with open(out, "wb") as o, open(err, "wb") as e:
        popen = subprocess.Popen([sys.executable, "-m", "moeprep.cli", *map(str, args)], cwd=ROOT,
                                 stdin=subprocess.DEVNULL, stdout=o, stderr=e, start_new_session=True)
    _LIVE.append(popen)
    return Proc(popen, out, err)


def moeprep(*args, timeout: float = 240) -> Proc:
    """Run `moeprep ARGS...` to the end."""
    proc = spawn(*args)
    proc.wait(timeout)
    return proc


def _kill_group(popen: subprocess.Popen) -> None:
    if popen.poll() is None:
        try:
            os.killpg(popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        popen.wait()


def stop_everything() -> None:
    while _LIVE:
        _kill_group(_LIVE.pop())


@pytest.fixture(autouse=True)
def _no_process_outlives_its_test():
    yield
    stop_everything()


def reach(proc: Proc, predicate: Callable[[], bool], timeout: float = 180, interval: float = 0.002) -> bool:
    """Poll until `predicate()` holds (True) or the process ends first (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if predicate():
            return True
        time.sleep(interval)
    _kill_group(proc.popen)
    raise AssertionError(f"the fault point was not reached within {timeout} s; stderr:\n{proc.stderr}")


def kill_when(proc: Proc, predicate: Callable[[], bool], sig: int = signal.SIGKILL, timeout: float = 180) -> bool:
    """Send `sig` the moment `predicate()` holds; False if the process ended first.

    SIGKILL goes to moeprep's whole process group (as a killed terminal or CI job does); SIGINT and
    SIGTERM go to moeprep itself. Children that moeprep put in sessions of their own are not hit
    directly: they must not outlive it by its own doing.
    """
    if not reach(proc, predicate, timeout):
        return False
    if sig == signal.SIGKILL:
        os.killpg(proc.pid, sig)
    else:
        os.kill(proc.pid, sig)
    return True


def killed(proc: Proc, predicate: Callable[[], bool], what: str) -> None:
    """SIGKILL at `what`, and wait for the process; fails if the run finished before that point."""
    assert kill_when(proc, predicate), f"moeprep finished before {what} (exit {proc.poll()}):\n{proc.stderr}"
    assert proc.wait() == -signal.SIGKILL


def wait_until(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def converters(out: Path) -> list[str]:
    """Live convert_hf_to_gguf processes writing into `out` (/proc, so no psutil or pgrep is needed)."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().decode(errors="replace").split("\0")
            state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z" and any("convert_hf_to_gguf" in c for c in cmd) and any(str(out) in c for c in cmd):
            found.append(f"pid {d.name}: {' '.join(cmd)}")
    return found


def only_error_line(proc: Proc) -> str:
    """The run failed with exit 1 and one `Error: ` line, last, after nothing but `moeprep: ` status lines."""
    err = proc.stderr
    assert proc.poll() == 1, f"exit {proc.poll()}, expected 1; stderr:\n{err}"
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("Error: "), err
    assert all(line.startswith("moeprep: ") for line in lines[:-1]), f"more than one error line:\n{err}"
    return lines[-1]


def succeeded(proc: Proc) -> Proc:
    assert proc.poll() == 0, f"exit {proc.poll()}; stderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


# --- checking an output directory ------------------------------------------------------------------

def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(files) -> str:
    """The source fingerprint as the manifest format documents it, computed here."""
    lines = "".join(f"{f.sha256}  {f.path}\n" for f in sorted(files, key=lambda f: f.path))
    return hashlib.sha256(lines.encode()).hexdigest()


def _in_partial(path: Path, out: Path) -> bool:
    return any(part.endswith(".partial") for part in path.relative_to(out).parts)


def problems(out: Path, model: str = MODEL, source: str | None = None, *, finished: bool = False) -> list[str]:
    """What is wrong with `out` as a moeprep output directory of `model` (empty: nothing).

    With `finished` (a run that ended normally), also: every file the manifest lists exists, a manifest
    exists and no `.partial` is left. Without it (after a kill), a listed file may be missing: written in
    the order record-then-rename, a kill between the two leaves that, and the rerun makes it; what must
    never be is a final-named file that the manifest does not list, or lists with other bytes.
    """
    found = []
    ggufs = {p.relative_to(out).as_posix() for p in out.rglob("*.gguf") if not _in_partial(p, out)}
    if not mf.path_in(out).exists():
        if finished:
            found.append("no manifest.json after a finished run")
        found += [f"{g} is on disk, looks finished, and there is no manifest" for g in sorted(ggufs)]
        return found
    try:
        json.loads(mf.path_in(out).read_text(encoding="utf-8"))
        m = mf.load(out)
    except Exception as e:  # noqa: BLE001 - any failure to read it is the finding
        return found + [f"manifest.json does not parse: {e}"]
    if m.model != model:
        found.append(f"manifest.model is {m.model!r}, not {model!r}")
    if source is not None and m.source.id != source:
        found.append(f"manifest.source.id is {m.source.id!r}, not {source!r}")
    listed = set()
    base = [a for a in m.artifacts if a.stage == "convert"]
    if m.artifacts and len(base) != 1:
        found.append(f"{len(base)} converted files recorded, not 1")
    for a in m.artifacts:
        if not Path(a.path).name.startswith(f"{model}-"):
            found.append(f"{a.path} is listed but is not a file of {model}")
        files = [(a.path, a.size, a.sha256)] + [(s.path, s.size, s.sha256) for s in a.shards]
        for path, size, digest in files:
            listed.add(path)
            p = out / path
            if not p.is_file():
                if finished:  # after a kill, a record written just before its rename is no harm: the rerun remakes it
                    found.append(f"{path} is listed but missing")
            elif p.stat().st_size != size:
                found.append(f"{path} is {p.stat().st_size} bytes, the manifest says {size}")
            elif sha256(p) != digest:
                found.append(f"{path} does not hash to the manifest's sha256")
        for s in a.shards:
            if s.made_from != a.sha256:
                found.append(f"shard {s.path} was not made from {a.path}")
        if base and a is not base[0] and a.made_from != base[0].sha256:
            found.append(f"{a.path} made_from is not the F16's sha256")
    if base and base[0].made_from != fingerprint(m.source.files):
        found.append(f"{base[0].path} made_from is not the fingerprint of the listed source files")
    if m.imatrix is not None:
        listed.add(m.imatrix.path)
    for g in sorted(ggufs - listed):
        found.append(f"{g} is on disk with a final name but not in the manifest")
    if m.smoke is not None:
        paths = {a.path for a in m.artifacts}
        for name in m.smoke.artifacts:
            if name not in paths:
                found.append(f"smoke result for {name}, which the manifest does not list")
    if finished:
        leftovers = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.partial*"))
        if leftovers:
            found.append(f"partials left after a finished run: {leftovers}")
    return found


def manifest_lists(out: Path, name: str) -> bool:
    try:
        data = json.loads(mf.path_in(out).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return any(a.get("path") == name for a in data.get("artifacts", []))


def manifest_count(out: Path) -> int:
    try:
        return len(json.loads(mf.path_in(out).read_text(encoding="utf-8")).get("artifacts", []))
    except (OSError, ValueError):
        return 0


def quants(out: Path) -> list[str]:
    return [a.quant for a in mf.load(out).artifacts]


def lock_holder(out: Path) -> str:
    try:
        return (out / LOCK).read_text()
    except OSError:
        return ""


# --- directories to break --------------------------------------------------------------------------

def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(LOCK, "logs"))
    return dst


@pytest.fixture
def converted(converted_phimoe, tmp_path) -> Path:
    """A copy of the converted tiny Phi-MoE (F16, Q8_0, Q4_K_M, Q2_K) from the local Hub."""
    return _copy(converted_phimoe, tmp_path / "tiny-phimoe-GGUF")


def f16_only(converted_phimoe: Path, dst: Path) -> Path:
    """The converted tiny Phi-MoE with only its F16 made and recorded: what quantize starts from."""
    dst.mkdir(parents=True, exist_ok=True)
    data = json.loads(mf.path_in(converted_phimoe).read_text())
    data["artifacts"] = [a for a in data["artifacts"] if a["stage"] == "convert"]
    data["smoke"] = None
    [base] = data["artifacts"]
    shutil.copy2(converted_phimoe / base["path"], dst / base["path"])
    mf.path_in(dst).write_text(json.dumps(data, indent=2))
    return dst


# --- SIGKILL, SIGINT and SIGTERM during convert and quantize ----------------------------------------

def disagree(out: Path, name: str) -> Callable[[], bool]:
    """A finished file and the manifest disagree about `name`: one is written, the other not yet."""
    return lambda: (out / name).exists() != manifest_lists(out, name)


def test_fault_sigkill_during_convert_then_rerun_finishes(checkpoints, tmp_path):
    out = tmp_path / "out"
    source = str(checkpoints["phimoe"])
    cmd = ("convert", source, "--out", out, "--quant", "Q2_K")
    partial = out / "tiny-phimoe-F16.gguf.partial"
    found = []

    # 1. while the converter writes the F16: it must go down with moeprep (PR_SET_PDEATHSIG)
    proc = spawn(*cmd)
    assert kill_when(proc, lambda: partial.exists() and partial.stat().st_size > 0 and converters(out)), proc.stderr
    proc.wait()
    assert wait_until(lambda: not converters(out), 3), f"the converter outlived a SIGKILLed moeprep: {converters(out)}"
    assert not (out / "tiny-phimoe-F16.gguf").exists(), "a killed conversion left a file that looks finished"
    found += [f"after a kill mid-conversion: {p}" for p in problems(out, source=source)]

    # 2. where the F16 and the manifest disagree: renamed into place and not yet recorded (or the reverse)
    proc = spawn(*cmd)
    if kill_when(proc, disagree(out, "tiny-phimoe-F16.gguf")):
        assert proc.wait() == -signal.SIGKILL
        found += [f"after a kill between the F16's rename and its record: {p}" for p in problems(out, source=source)]
    else:  # no such window was caught: the run finished, and must be clean
        succeeded(proc)

    # 3. the rerun finishes
    succeeded(moeprep(*cmd))
    assert quants(out) == ["F16", "Q2_K"]
    found += [f"after the rerun: {p}" for p in problems(out, source=source, finished=True)]
    assert found == [], "\n".join(found)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_fault_signal_mid_conversion_exits_130_and_stops_the_converter(checkpoints, tmp_path, sig):
    out = tmp_path / "out"
    partial = out / "tiny-phimoe-F16.gguf.partial"
    proc = spawn("convert", checkpoints["phimoe"], "--out", out, "--quant", "Q2_K")
    assert kill_when(proc, lambda: partial.exists() and partial.stat().st_size > 0 and converters(out), sig), proc.stderr
    assert proc.wait(30) == 130, proc.stderr
    err = proc.stderr
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1] == INTERRUPTED and lines.count(INTERRUPTED) == 1, err
    assert all(line.startswith("moeprep: ") for line in lines[:-1]), err
    assert converters(out) == [], "the converter still runs after moeprep reported the interruption"
    sizes = {p: p.stat().st_size for p in out.rglob("*.partial")}
    time.sleep(1.0)
    assert {p: p.stat().st_size for p in out.rglob("*.partial")} == sizes, "a .partial keeps growing"
    assert problems(out) == []


def test_fault_sigkill_at_each_quantize_point_then_rerun_finishes(converted_phimoe, hub, tmp_path):
    out = f16_only(converted_phimoe, tmp_path / "out")
    cmd = ("convert", HUB_SOURCE, "--out", out, "--quant", "Q8_0", "--quant", "Q4_K_M", "--quant", "Q2_K")
    found = []

    # 1. while llama.cpp writes a quant
    killed(spawn(*cmd), lambda: any(out.glob("*-Q*.gguf.partial")), "a quant was being written")
    found += [f"after a kill mid-quantize: {p}" for p in problems(out, source=HUB_SOURCE)]
    assert "tiny-phimoe-F16.gguf" in {a.path for a in mf.load(out).artifacts}

    # 2. the moment the manifest gains a quant
    before = manifest_count(out)
    killed(spawn(*cmd), lambda: manifest_count(out) > before, "the manifest gained a quant")
    found += [f"after a kill once a quant was recorded: {p}" for p in problems(out, source=HUB_SOURCE)]

    # 3. where Q4_K_M and the manifest disagree: renamed into place and not yet recorded (or the reverse)
    proc = spawn(*cmd)
    if kill_when(proc, disagree(out, "tiny-phimoe-Q4_K_M.gguf")):
        assert proc.wait() == -signal.SIGKILL
        found += [f"after a kill between Q4_K_M's rename and its record: {p}" for p in problems(out, source=HUB_SOURCE)]
    else:  # no such window was caught: the run finished, and must be clean
        succeeded(proc)

    # 4. the rerun finishes what is left, and keeps what was made
    rerun = succeeded(moeprep(*cmd, "--json"))
    assert json.loads(rerun.stdout)["kept"][:2] == ["tiny-phimoe-F16.gguf", "tiny-phimoe-Q8_0.gguf"]
    assert quants(out) == ["F16", "Q8_0", "Q4_K_M", "Q2_K"]
    found += [f"after the rerun: {p}" for p in problems(out, source=HUB_SOURCE, finished=True)]
    assert found == [], "\n".join(found)


# --- two commands on one directory -------------------------------------------------------------------

def refusal(out: Path, holder: Proc) -> str:
    return f"Error: another moeprep command is writing into {out}: pid {holder.pid} ("


def test_fault_two_converts_at_once_one_refuses(converted_phimoe, hub, tmp_path):
    out = f16_only(converted_phimoe, tmp_path / "out")
    cmd = ("convert", HUB_SOURCE, "--out", out, "--quant", "Q8_0", "--quant", "Q4_K_M", "--quant", "Q2_K")
    a, b = spawn(*cmd), spawn(*cmd)
    codes = sorted([a.wait(), b.wait()])
    assert codes == [0, 1], f"exit codes {codes}:\n{a.stderr}\n---\n{b.stderr}"
    winner, loser = (a, b) if a.poll() == 0 else (b, a)
    assert loser.stderr.startswith(refusal(out, winner)), loser.stderr
    assert len(loser.stderr.strip().splitlines()) == 1, loser.stderr
    assert problems(out, source=HUB_SOURCE, finished=True) == []

    rerun = succeeded(moeprep(*cmd, "--json"))
    assert json.loads(rerun.stdout)["made"] == []
    assert problems(out, source=HUB_SOURCE, finished=True) == []


def test_fault_convert_while_a_release_writes_the_directory(converted_phimoe, hub, tmp_path):
    out = f16_only(converted_phimoe, tmp_path / "out")
    release = spawn("release", TINY, "--stages", "download,convert,quantize,probe", "--out", out)  # no Hub write
    assert wait_until(lambda: lock_holder(out).startswith(f"pid {release.pid} (release") or release.poll() is not None,
                      60) and release.poll() is None, f"the release never held the lock:\n{release.stderr}"
    convert = ("convert", HUB_SOURCE, "--out", out, "--quant", "Q8_0", "--quant", "Q4_K_M", "--quant", "Q2_K")
    refused = moeprep(*convert)
    assert release.poll() is None, "the release finished before the convert ran: the race was not tested"
    assert only_error_line(refused).startswith(refusal(out, release)), refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    release.wait()
    succeeded(release)
    assert len(mf.load(out).artifacts) == 7  # the recipe's six quants and the F16
    assert problems(out, source=HUB_SOURCE, finished=True) == []

    rerun = succeeded(moeprep(*convert, "--json"))
    assert json.loads(rerun.stdout)["made"] == []
    assert problems(out, source=HUB_SOURCE, finished=True) == []


def test_fault_other_model_into_the_same_directory_is_refused(checkpoints, converted, hub):
    before = mf.path_in(converted).read_bytes()
    proc = moeprep("convert", checkpoints["mixtral"], "--out", converted)
    line = only_error_line(proc)
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert f"{converted} holds the GGUFs of {HUB_SOURCE}, not {checkpoints['mixtral']}" in line, line
    assert mf.path_in(converted).read_bytes() == before, "the refused convert changed the phimoe manifest"
    assert not list(converted.rglob("tiny-mixtral*")), "the refused convert left mixtral files behind"
    assert problems(converted, source=HUB_SOURCE, finished=True) == []

    succeeded(moeprep("convert", HUB_SOURCE, "--out", converted))  # the directory's own model still converts
    assert problems(converted, source=HUB_SOURCE, finished=True) == []


# --- a full disk ---------------------------------------------------------------------------------------

@pytest.fixture
def small_fs(tmp_path):
    """mount(size_mib) -> a fresh tmpfs of that size; skipped where this machine cannot mount one."""
    mounted: list[Path] = []

    def mount(size_mib: int) -> Path:
        where = tmp_path / f"small-fs-{len(mounted)}"
        where.mkdir()
        if shutil.which("mount") is None:
            pytest.skip("no mount(8) here: the disk-full cases need a small tmpfs")
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", str(where)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here ({(r.stderr or r.stdout).strip() or r.returncode}); "
                        "the disk-full cases need one (root or CAP_SYS_ADMIN)")
        mounted.append(where)
        return where

    try:
        yield mount
    finally:
        stop_everything()  # nothing may still write there
        for where in mounted:
            if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(where)], capture_output=True)


def resize(where: Path, size_mib: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size_mib}m", str(where)], check=True, capture_output=True)


def free_bytes(where: Path) -> int:
    st = os.statvfs(where)
    return st.f_bavail * st.f_frsize


def fill(where: Path, leave: int = 256 * 1024) -> Path:
    """Take all but `leave` bytes of the filesystem with a filler file."""
    filler = where / "filler.bin"
    block = b"\xa5" * (1 << 20)
    with open(filler, "ab", buffering=0) as f:
        while (n := min(len(block), free_bytes(where) - leave)) > 0:
            try:
                f.write(block[:n])
            except OSError:
                break
    return filler


def test_fault_disk_too_small_is_refused_up_front_then_rerun_finishes(converted_phimoe, hub, small_fs):
    fs = small_fs(30)  # the F16 (25 MiB) fits, its three quants (about 28 MiB planned) do not
    out = f16_only(converted_phimoe, fs / "out")
    cmd = ("convert", HUB_SOURCE, "--out", out, "--quant", "Q8_0", "--quant", "Q4_K_M", "--quant", "Q2_K")
    proc = moeprep(*cmd)
    assert only_error_line(proc).startswith(f"Error: not enough free disk in {out}"), proc.stderr
    assert not list(out.rglob("*.partial")) and quants(out) == ["F16"]
    assert problems(out, source=HUB_SOURCE, finished=True) == []

    resize(fs, 80)
    succeeded(moeprep(*cmd))
    assert quants(out) == ["F16", "Q8_0", "Q4_K_M", "Q2_K"]
    assert problems(out, source=HUB_SOURCE, finished=True) == []


@pytest.mark.parametrize("stage", ["convert", "quantize"])
def test_fault_disk_fills_up_mid_write_then_rerun_finishes(checkpoints, converted_phimoe, hub, small_fs, stage):
    fs = small_fs(40)  # passes the up-front check; then a filler file takes the rest while the file is written
    if stage == "convert":
        out, source, quant = fs / "out", str(checkpoints["phimoe"]), "Q2_K"
        partial = out / "tiny-phimoe-F16.gguf.partial"
    else:
        out, source, quant = f16_only(converted_phimoe, fs / "out"), HUB_SOURCE, "Q4_K_M"
        partial = out / "tiny-phimoe-Q4_K_M.gguf.partial"
    cmd = ("convert", source, "--out", out, "--quant", quant)
    proc = spawn(*cmd)
    assert reach(proc, lambda: partial.exists() and partial.stat().st_size > 0), \
        f"the {stage} finished before the disk could be filled:\n{proc.stderr}"
    filler = fill(fs)
    proc.wait()
    line = only_error_line(proc)
    print(line)
    assert "disk filled up" in line or "not enough free disk" in line, line
    assert not list(out.rglob("*.partial")), "the failed write left its .partial on the full disk"
    assert problems(out, source=source) == []

    filler.unlink()
    succeeded(moeprep(*cmd))
    assert quants(out) == ["F16", quant]
    assert problems(out, source=source, finished=True) == []


# --- push, smoke and card ------------------------------------------------------------------------------

class PutGate:
    """Lets the first `allow` LFS uploads through; holds later ones until released, then drops them."""

    def __init__(self, hub, monkeypatch, allow: int):
        self.allow, self.arrived, self.held = allow, 0, 0
        self.release = threading.Event()
        self._lock = threading.Lock()
        handler = hub.httpd.RequestHandlerClass
        original = handler.do_PUT
        gate = self

        def do_PUT(request):
            with gate._lock:
                n = gate.arrived
                gate.arrived += 1
                if n >= gate.allow:
                    gate.held += 1
            if n < gate.allow:
                return original(request)
            gate.release.wait(60)
            request.close_connection = True  # the client is gone: answer nothing

        monkeypatch.setattr(handler, "do_PUT", do_PUT)

    def open(self) -> None:
        """Drop the uploads held so far; let every later one through."""
        with self._lock:
            self.allow = 10**9
        self.release.set()


def remote_problems(hub, repo_id: str, out: Path) -> list[str]:
    repo = hub.repos.get(repo_id)
    if repo is None:
        return [f"{repo_id} does not exist on the Hub"]
    m = mf.load(out)
    want = {p: sha for a in m.artifacts for p, _, sha, _ in a.upload_files()}
    found = [f"{p}: on the Hub {repo.sha256(p) if p in repo.files else 'missing'}, manifest {sha}"
             for p, sha in want.items() if p not in repo.files or repo.sha256(p) != sha]
    for name in ("README.md", "manifest.json"):
        if repo.files.get(name) != (out / name).read_bytes():
            found.append(f"{name} on the Hub differs from the local one")
    extra = sorted(p for p in repo.files if p.endswith(".gguf") and p not in want)
    return found + [f"{p} is on the Hub but not in the manifest" for p in extra]


def commit_all_or_nothing(hub, repo_id: str, out: Path) -> list[str]:
    repo = hub.repos.get(repo_id)
    if repo is None or not [p for p in repo.files if p.endswith(".gguf")]:
        return []
    return [f"a partial commit: {p}" for p in remote_problems(hub, repo_id, out)]


@pytest.mark.parametrize("command", ["push", "card --push"])
def test_fault_sigkill_mid_upload_then_rerun_finishes(hub, converted, write_token, monkeypatch, command):
    repo_id = f"me/fault-{command.replace(' --', '-')}-GGUF"
    if command == "push":
        succeeded(moeprep("card", converted, "--repo-id", repo_id))
        cmd = ("push", converted, "--repo-id", repo_id)
    else:
        cmd = ("card", converted, "--repo-id", repo_id, "--push")

    # 1. one LFS upload done, the next in flight
    gate = PutGate(hub, monkeypatch, allow=1)
    try:
        killed(spawn(*cmd), lambda: gate.held >= 1 and len(hub.lfs.get(repo_id, {})) >= 1, "an upload was in flight")
    finally:
        gate.open()
    repo = hub.repos.get(repo_id)
    assert repo is None or not [p for p in repo.files if p.endswith(".gguf")], "a killed push left a commit"
    assert problems(converted, source=HUB_SOURCE) == []
    sent = len(hub.lfs.get(repo_id, {}))

    # 2. the moment the commit is sent
    start = len(hub.requests)
    proc = spawn(*cmd)
    if kill_when(proc, lambda: any(r[0] == "POST" and "/commit/" in r[1] for r in hub.requests[start:])):
        print("killed as the commit was sent")
        proc.wait()
        time.sleep(0.3)  # let the server finish the request it was reading
    else:
        print("the push finished before its commit could be caught")
        succeeded(proc)
    puts = [r for r in hub.requests[start:] if r[0] == "PUT"]
    assert len(puts) == 4 - sent, "LFS objects uploaded before the kill were sent again"
    assert commit_all_or_nothing(hub, repo_id, converted) == []
    assert problems(converted, source=HUB_SOURCE) == []

    # 3. the rerun finishes; the Hub holds exactly the manifest's files
    start = len(hub.requests)
    succeeded(moeprep(*cmd))
    assert not [r for r in hub.requests[start:] if r[0] == "PUT"], "every LFS object was uploaded already"
    assert remote_problems(hub, repo_id, converted) == []
    assert problems(converted, source=HUB_SOURCE, finished=True) == []
    if command == "push":
        again = succeeded(moeprep(*cmd, "--json"))
        assert {i["action"] for r in json.loads(again.stdout)["repos"] for i in r["items"]} == {SKIP}


def test_fault_sigkill_mid_smoke_then_rerun_finishes(converted):
    cmd = ("smoke", converted, "--placement", "cpu-moe", "--runs", "1", "--tokens", "4", "--ctx", "128",
           "--quality-ctx", "128", "--quality-chunks", "2")
    proc = spawn(*cmd)
    killed(proc, lambda: "smoke tiny-phimoe-Q4_K_M.gguf" in proc.stderr, "the third file was being smoked")
    assert problems(converted, source=HUB_SOURCE) == []
    m = mf.load(converted)
    assert m.smoke is None or all(sha256(converted / p) == e.sha256 for p, e in m.smoke.artifacts.items())

    succeeded(moeprep(*cmd))
    m = mf.load(converted)
    assert set(m.smoke.artifacts) == {a.path for a in m.artifacts}
    for path, entry in m.smoke.artifacts.items():
        assert entry.sha256 == sha256(converted / path), path
    assert problems(converted, source=HUB_SOURCE, finished=True) == []


def card_ok(out: Path) -> list[str]:
    """README.md absent, or complete: it passes `moeprep card --check`."""
    card = out / "README.md"
    if not card.exists():
        return []
    result = CliRunner().invoke(main, ["card", "--check", str(card)])
    return [] if result.exit_code == 0 else [f"README.md after the kill fails the lint: {result.output}"]


def test_fault_sigkill_card_while_splitting_and_writing(converted):
    cmd = ("card", converted, "--max-shard", "5MiB")
    found = []
    points = [
        ("the F16 was being split", lambda: (converted / "F16.partial").is_dir()),
        ("the F16's shards and the manifest disagree (one written, the other not yet)",
         lambda: (converted / "F16").is_dir() != bool(recorded_shards(converted, "F16"))),
        ("every split was recorded and the card not yet written",
         lambda: recorded_shards(converted, "Q4_K_M") and not (converted / "README.md").exists()),
        ("the card was being written", lambda: (converted / "README.md.partial").exists()),
    ]
    for what, predicate in points:
        proc = spawn(*cmd)
        if kill_when(proc, predicate):
            print(f"killed when {what}")
            proc.wait()
            found += [f"after a kill when {what}: {p}" for p in problems(converted, source=HUB_SOURCE) + card_ok(converted)]
        else:  # a window too short to catch here: the run finished, which must be clean
            print(f"the run finished before {what}")
            succeeded(proc)
            found += [f"after a run that passed the point '{what}': {p}" for p in card_ok(converted)]
            (converted / "README.md").unlink(missing_ok=True)
    succeeded(moeprep(*cmd))
    assert card_ok(converted) == [] and (converted / "README.md").is_file()
    assert all(a.shards for a in mf.load(converted).artifacts if a.quant in ("F16", "Q8_0", "Q4_K_M")), \
        "`card --max-shard 5MiB` did not split the files larger than 5 MiB: no split was there to interrupt"
    found += [f"after the rerun: {p}" for p in problems(converted, source=HUB_SOURCE, finished=True)]
    assert found == [], "\n".join(found)


def recorded_shards(out: Path, quant: str) -> list:
    try:
        data = json.loads(mf.path_in(out).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return next((a.get("shards") or [] for a in data.get("artifacts", []) if a.get("quant") == quant), [])
