from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

from gateway.controlplane.registry import RegistryData
from gateway.local_stack import (
    beside_other_workers,
    ready_line,
    stop_process_group,
    write_local_registry,
)


def test_local_registry_points_at_the_worker_with_model_defaults(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": 2, "temperature": 0.6, "top_p": 0.9}))
    data = RegistryData.model_validate(yaml.safe_load(
        write_local_registry(tmp_path, 9123, model).read_text()))
    deployment, embedding = data.deployments
    assert deployment.replicas[0].url == "http://127.0.0.1:9123"
    assert deployment.generation_config == {"temperature": 0.6, "top_p": 0.9}
    assert embedding.task == "embed" and embedding.replicas[0].url == "http://127.0.0.1:9124"


def test_ready_line_has_a_working_key_and_model() -> None:
    line = ready_line(8000)
    assert "Bearer fw_local_key" in line and "smollm2-135m-instruct" in line


def test_stopping_kills_the_whole_group(tmp_path: Path) -> None:
    marker = tmp_path / "grandchild.pid"
    script = (f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', "
              f"'import time; time.sleep(60)']); open({str(marker)!r}, 'w').write(str(p.pid)); "
              f"time.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    for _ in range(100):
        if marker.exists() and marker.read_text():
            break
        time.sleep(0.05)
    grandchild = int(marker.read_text())
    stop_process_group(parent, grace=5)  # type: ignore[arg-type]
    time.sleep(0.2)
    assert parent.poll() is not None
    assert not Path(f"/proc/{grandchild}").exists() or \
        "Z" in Path(f"/proc/{grandchild}/stat").read_text().split()[2]


def test_workers_beside_others_are_unpinned_with_one_thread_unless_set() -> None:
    assert beside_other_workers({}) == {"VLLM_CPU_OMP_THREADS_BIND": "nobind",
                                        "OMP_NUM_THREADS": "1"}
    mine = {"VLLM_CPU_OMP_THREADS_BIND": "0-3", "OMP_NUM_THREADS": "4"}
    assert beside_other_workers(dict(mine)) == mine
