"""The run's folders before any rank starts: folders that cannot be written, checkpoint manifests
(what damage verify_checkpoint finds), the choice of the checkpoint to resume from, and settings
that may not change on resume.

Run: .venv/bin/python -m pytest tests/unit/test_run_folder_checks.py
"""

import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from trb_nemo.commands.preflight import preflight
from trb_nemo.config.compose import composed_yaml, load_config
from trb_nemo.config.schema import ConfigError
from trb_nemo.models.folders import MODEL_META, step_folder
from trb_nemo.models.megatron_io import MANIFEST, verify_checkpoint, write_manifest
from trb_nemo.train.checkpoint import (
    choose_resume,
    move_aside_newer,
    remove_unfinished_saves,
)
from trb_nemo.train.run_dir import (
    CONFIG_CHANGES,
    RESUME_ENV,
    RunFolder,
    config_differences,
    portable_yaml,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _own_resume_choice(monkeypatch):
    """The pre-flight hands its choice to the ranks through the environment: keep it here."""
    monkeypatch.setenv(RESUME_ENV, "")


def fake_checkpoint(folder: Path, step: int, config_yaml: str | None = None) -> Path:
    """A training checkpoint's files for 2 ranks (random bytes where tensors would be)."""
    folder.mkdir(parents=True)
    rng = __import__("random").Random(step)
    for name, size in ((".metadata", 3000), ("__0_0.distcp", 70_000), ("__1_0.distcp", 65_000),
                       ("rank_00000.pt", 900), ("rank_00001.pt", 900)):
        (folder / name).write_bytes(rng.randbytes(size))
    (folder / MODEL_META).write_text(json.dumps({"format": 1, "step": step, "world_size": 2}))
    if config_yaml is not None:
        (folder / "config.yaml").write_text(config_yaml)
    write_manifest(folder, world_size=2)
    return folder


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


# ------------------------------------------------------------------------------------ manifest


def test_manifest_lists_every_file_with_size_and_checksum(tmp_path):
    folder = fake_checkpoint(tmp_path / "step_0000002", 2)
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["world_size"] == 2 and manifest["checksum"] == "crc32"
    on_disk = {p.name for p in folder.iterdir()} - {MANIFEST}
    assert set(manifest["files"]) == on_disk
    assert manifest["files"]["__0_0.distcp"][0] == 70_000
    assert verify_checkpoint(folder) is None
    assert verify_checkpoint(folder, checksums=False) is None


@pytest.mark.parametrize("damage, cheap_finds_it, expected", [
    (lambda f: (f / "__1_0.distcp").unlink(), True, "__1_0.distcp is missing"),
    (lambda f: truncate(f / "__0_0.distcp"), True, "__0_0.distcp has 35000 bytes, 70000 were"),
    (lambda f: truncate(f / ".metadata", 0.1), True, ".metadata has 300 bytes"),
    (lambda f: (f / "rank_00001.pt").unlink(), True, "rank_00001.pt is missing"),
    (lambda f: flip_a_byte(f / "__1_0.distcp"), False, "__1_0.distcp does not match its checksum"),
    (lambda f: truncate(f / MANIFEST), True, "manifest.json is unreadable"),
], ids=["distcp-deleted", "distcp-truncated", "metadata-truncated", "rank-file-missing",
        "same-size-corruption", "manifest-truncated"])
def test_verify_finds_each_damage(tmp_path, damage, cheap_finds_it, expected):
    folder = fake_checkpoint(tmp_path / "step_0000002", 2)
    damage(folder)
    assert expected in verify_checkpoint(folder)
    cheap = verify_checkpoint(folder, checksums=False)
    assert (expected in cheap) if cheap_finds_it else cheap is None


def test_folder_without_manifest_gets_the_cheap_checks(tmp_path):
    """Saved by an older trb-nemo (the shipped toy models too): no manifest to verify against,
    but torch DCP's own index (.metadata) and the rank files recorded in the metadata are."""
    toy = ROOT / "examples/toy_math/checkpoints"
    for role in ("student", "teacher"):
        assert not (toy / role / MANIFEST).exists()
        assert verify_checkpoint(toy / role) is None
    folder = tmp_path / "step_0000002"
    shutil.copytree(toy / "student", folder)
    meta = json.loads((folder / MODEL_META).read_text())
    (folder / MODEL_META).write_text(json.dumps({**meta, "step": 2, "world_size": 2}))
    for r in (0, 1):
        (folder / f"rank_{r:05d}.pt").write_bytes(b"rng")
    assert verify_checkpoint(folder) is None
    (folder / "rank_00001.pt").unlink()
    assert verify_checkpoint(folder) == "rank_00001.pt is missing"
    size = (folder / "__0_0.distcp").stat().st_size
    truncate(folder / "__0_0.distcp")
    assert verify_checkpoint(folder) == f"__0_0.distcp has {size // 2} bytes, {size} are indexed"
    (folder / "__0_0.distcp").unlink()
    assert verify_checkpoint(folder) == "__0_0.distcp is missing"
    truncate(folder / ".metadata")
    assert verify_checkpoint(folder) == ".metadata is unreadable"


# ------------------------------------------------------------------------ choosing the resume


def test_choose_resume_skips_damaged_with_one_line_each_and_stops_when_none_is_left(tmp_path):
    assert choose_resume(tmp_path / "none") is None
    for step in (2, 4, 6):
        fake_checkpoint(step_folder(tmp_path, step), step)
    (step_folder(tmp_path, 6) / "__0_0.distcp").unlink()
    truncate(step_folder(tmp_path, 4) / ".metadata")
    lines = []
    assert choose_resume(tmp_path, warn=lines.append) == step_folder(tmp_path, 2)
    assert lines == [
        f"trb-nemo: checkpoint {step_folder(tmp_path, 6)} is damaged (__0_0.distcp is missing); "
        "resuming from step_0000002 (the damaged folder is kept as step_0000006.damaged)",
        f"trb-nemo: checkpoint {step_folder(tmp_path, 4)} is damaged (.metadata has 1500 bytes, "
        "3000 were written); resuming from step_0000002 (the damaged folder is kept as "
        "step_0000004.damaged)"]
    (step_folder(tmp_path, 2) / "rank_00000.pt").unlink()
    with pytest.raises(ConfigError) as err:
        choose_resume(tmp_path, warn=lines.append)
    assert err.value.key == "checkpoint.dir"
    assert "step_0000002: rank_00000.pt is missing" in err.value.reason
    assert len(lines) == 2  # no warning when nothing is resumed
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "step_0000002", "step_0000004", "step_0000006"]  # nothing deleted


def test_unfinished_saves_go_and_damaged_newer_folders_move_aside(tmp_path):
    for step in (2, 4):
        fake_checkpoint(step_folder(tmp_path, step), step)
    (tmp_path / "step_0000006.tmp").mkdir()
    (tmp_path / "step_0000006.tmp" / "__0_0.distcp").write_bytes(b"\0" * 10)
    (tmp_path / "notes.tmp").mkdir()  # not ours: left alone
    assert remove_unfinished_saves(tmp_path) == ["step_0000006.tmp"]
    assert move_aside_newer(tmp_path, step_folder(tmp_path, 2)) == ["step_0000004.damaged"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "notes.tmp", "step_0000002", "step_0000004.damaged"]


# ----------------------------------------------------------------- settings that define a run


def _as_dict(cfg) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.create(composed_yaml(cfg)))


def test_which_settings_may_change_on_resume():
    old = _as_dict(load_config(["parallel=cpu_tp2"]))
    free = ["parallel=cpu_tp1", "optim.max_steps=7", "eval.interval=3", "logging.run_name=x",
            "logging.output_dir=elsewhere", "checkpoint.interval=1", "checkpoint.keep_last=4",
            "optim.micro_batch_size=4", "logging.progress_bar=false", "launcher.nodes=2",
            "model.student.name=renamed"]
    assert config_differences(old, _as_dict(load_config(free))) == []
    defining = ["loss.kind=full", "data.seed=5", "trb.eps0=0.05", "seed=3", "rollout.seed=2",
                "rollout.behavior=student", "optim.lr=0.002", "eval.num_problems=8",
                "model.teacher.checkpoint=elsewhere/teacher", "model.precision=bf16"]
    diffs = config_differences(old, _as_dict(load_config(free + defining)))
    assert sorted(k for k, _, _ in diffs) == sorted(o.split("=")[0] for o in defining)
    assert ("loss.kind", "topk", "full") in diffs


def test_a_moved_checkout_is_no_change(monkeypatch):
    """The toy models' paths follow the checkout (``${project_root:}``): a checkpoint saved in
    another checkout compares equal."""
    import trb_nemo.config.compose as compose

    real = compose.project_root()
    monkeypatch.setattr(compose, "project_root", lambda: Path("/old/checkout"))
    saved = portable_yaml(composed_yaml(load_config([], config_dir=real / "conf")))
    assert "/old/checkout" not in saved and "${project_root:}/examples" in saved
    monkeypatch.setattr(compose, "project_root", lambda: real)
    from omegaconf import OmegaConf

    now = portable_yaml(composed_yaml(load_config([])))
    assert config_differences(OmegaConf.to_container(OmegaConf.create(saved)),
                              OmegaConf.to_container(OmegaConf.create(now))) == []


def test_changed_settings_stop_or_are_recorded(tmp_path):
    run = ["logging.output_dir=" + str(tmp_path), "logging.run_name=r"]
    before = load_config(run)
    fake_checkpoint(tmp_path / "r" / "checkpoints" / "step_0000004", 4,
                    portable_yaml(composed_yaml(before)))
    (tmp_path / "r" / "config.yaml").write_text(composed_yaml(before))
    changed = run + ["loss.kind=full", "optim.max_steps=120"]
    with pytest.raises(ConfigError) as err:
        preflight(load_config(changed))
    assert err.value.key == "checkpoint.allow_config_change"
    assert "loss.kind: 'topk' -> 'full'" in err.value.reason
    assert "max_steps" not in err.value.reason
    assert "\n" not in str(err.value)
    assert not (tmp_path / "r" / CONFIG_CHANGES).exists()

    allowed = load_config(changed + ["checkpoint.allow_config_change=true"])
    step4 = tmp_path / "r" / "checkpoints" / "step_0000004"
    for _ in range(2):  # a rerun before the next checkpoint does not record it twice
        cfg = preflight(allowed)
        # the pre-flight allows it but writes nothing: a start that fails changes no file
        assert not (tmp_path / "r" / CONFIG_CHANGES).exists() or _ == 1
        assert (tmp_path / "r" / "config.yaml").read_text() == composed_yaml(before) or _ == 1
        RunFolder.of(cfg).started(composed_yaml(cfg), step4)  # what the trainer does on rank 0
    records = [json.loads(line) for line in
               (tmp_path / "r" / CONFIG_CHANGES).read_text().splitlines()]
    assert len(records) == 1
    assert records[0]["step"] == 4 and records[0]["checkpoint"] == "step_0000004"
    assert records[0]["changes"] == {"loss.kind": ["topk", "full"]}
    # config.yaml describes the run now; the one it replaced is kept
    assert "kind: full" in (tmp_path / "r" / "config.yaml").read_text()
    kept = (tmp_path / "r" / "config.before_step_0000004.yaml").read_text()
    assert kept == composed_yaml(before)


def test_another_network_is_refused_even_when_changes_are_allowed(tmp_path):
    """A checkpoint of another architecture or vocabulary cannot be resumed with
    ``allow_config_change`` (it would crash after the ranks start): refused in one line that
    offers no such remedy and shows real paths, and nothing in the folder changes."""
    run = ["logging.output_dir=" + str(tmp_path), "logging.run_name=r"]
    before = load_config(run)
    fake_checkpoint(tmp_path / "r" / "checkpoints" / "step_0000004", 4,
                    portable_yaml(composed_yaml(before)))
    (tmp_path / "r" / "config.yaml").write_text(composed_yaml(before))
    listing = sorted(p.name for p in (tmp_path / "r").iterdir())
    for change in (["model.student.num_layers=3", "model.student.checkpoint=null"],
                   ["model.student.checkpoint=null", "model.teacher.checkpoint=null",
                    "model.student.vocab_size=200", "model.teacher.vocab_size=200"]):
        with pytest.raises(ConfigError) as err:
            preflight(load_config(run + change + ["checkpoint.allow_config_change=true"]))
        assert err.value.key == "logging.run_name", err.value
        assert "allow_config_change" not in err.value.reason
        assert "${project_root:}" not in err.value.reason
        assert "another logging.run_name" in err.value.reason
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == listing
    assert not (tmp_path / "r" / CONFIG_CHANGES).exists()


# ----------------------------------------------------------------- folders that cannot be written


def test_run_folders_that_cannot_be_written(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    cases = [([f"logging.output_dir={a_file}"], "logging.output_dir"),
             ([f"logging.output_dir={a_file}/x"], "logging.output_dir"),
             ([f"logging.output_dir={tmp_path}/out", f"checkpoint.dir={a_file}/ck"],
              "checkpoint.dir")]
    for overrides, key in cases:
        with pytest.raises(ConfigError) as err:
            preflight(load_config(overrides))
        assert err.value.key == key
        assert f"{str(a_file)!r} is a file, not a folder" in err.value.reason
    ok = preflight(load_config([f"logging.output_dir={tmp_path}/out", "logging.run_name=r"]))
    assert (tmp_path / "out" / "r" / "checkpoints").is_dir()  # created, and nothing else left
    assert list((tmp_path / "out" / "r").iterdir()) == [tmp_path / "out" / "r" / "checkpoints"]
    assert ok.logging.run_name == "r"


def test_read_only_checkpoint_dir(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        try:
            (folder / "probe").write_text("x")
        except PermissionError:
            pass
        else:
            pytest.skip("this user (root?) writes into read-only folders; the file-in-path "
                        "cases cover the check")
        with pytest.raises(ConfigError) as err:
            preflight(load_config([f"logging.output_dir={tmp_path}/out",
                                   f"checkpoint.dir={folder}"]))
        assert err.value.key == "checkpoint.dir" and "Permission denied" in err.value.reason
    finally:
        folder.chmod(0o755)


def test_cli_stops_in_one_line_before_any_rank_starts(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    def children_cpu_s():
        r = resource.getrusage(resource.RUSAGE_CHILDREN)
        return r.ru_utime + r.ru_stime

    cpu = children_cpu_s()
    out = subprocess.run([sys.executable, "-m", "trb_nemo.cli", "train",
                          f"logging.output_dir={a_file}/x"], capture_output=True, text=True,
                         timeout=120, env={**os.environ, RESUME_ENV: ""})
    cpu_s = children_cpu_s() - cpu  # ~4 s; starting the 2 ranks would cost over 20
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stdout == ""  # no "starting N local rank(s)"
    assert out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.startswith("trb-nemo: config error: logging.output_dir: cannot write")
    assert cpu_s < 12, cpu_s
