"""Docker cannot run here, so the files are checked the ways that can: compose's own validator."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = shutil.which("docker-compose")

needs_compose = pytest.mark.skipif(
    COMPOSE is None and not os.environ.get("CI"), reason="docker-compose is not installed (scripts/setup-tests.sh)"
)


def _compose(*args: str) -> subprocess.CompletedProcess:
    assert COMPOSE, "docker-compose must be installed in CI"
    return subprocess.run([COMPOSE, "-f", str(ROOT / "docker-compose.yml"), *args], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)


@needs_compose
def test_compose_file_is_valid_and_label_studio_is_behind_its_profile():
    assert _compose("config", "-q").returncode == 0
    services = yaml.safe_load(_compose("--profile", "labelstudio", "config").stdout)["services"]
    assert sorted(services) == ["freesegdiff", "label-studio", "redis"]
    assert services["label-studio"]["profiles"] == ["labelstudio"]
    assert "profiles" not in services["freesegdiff"] and "profiles" not in services["redis"]


@needs_compose
def test_compose_wires_the_backend_to_redis_and_label_studio():
    config = _compose("--profile", "labelstudio", "config").stdout
    assert "REDIS_URL: redis://redis:6379/0" in config
    assert "LABEL_STUDIO_URL: http://label-studio:8080" in config
    assert "volatile-lru" in config and "--maxmemory" in config  # evicts cache entries, never queued chunks


def test_the_compose_files_redis_keeps_the_store_across_a_restart(tmp_path):
    """Its own command line, on a real redis-server: a project's setup written, Redis restarted, still there."""
    from backend.labelstudio.projects import ProjectSetup, ProjectStore
    from backend.storage.shared_store import RedisStore
    from tests.redis_server import REDIS_SERVER, RedisServer

    redis = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["redis"]
    command = redis["command"]
    assert command[0] == "redis-server" and "redis-data:/data" in redis["volumes"]  # the image's --dir is /data
    assert command[command.index("--appendonly") + 1] == "yes"
    if REDIS_SERVER is None and not os.environ.get("CI"):
        pytest.skip("redis-server is not installed")
    server = RedisServer(tmp_path, options=command[1:])
    server.start()
    try:
        ProjectStore(RedisStore(server.url)).save("5", ProjectSetup("<View/>"))
        server.stop()  # SIGTERM, as docker compose restart sends: Redis flushes its AOF
        server.start()
        assert ProjectStore(RedisStore(server.url)).load("5") == ProjectSetup("<View/>")
    finally:
        server.stop()


def test_dockerfile_installs_like_ci_and_runs_unprivileged():
    dockerfile = (ROOT / "Dockerfile").read_text()
    ci = (ROOT / ".ci" / "run").read_text() + (ROOT / "scripts" / "setup-tests.sh").read_text()
    assert "RUN bash scripts/setup.sh" in dockerfile and "bash scripts/setup.sh" in ci
    assert "COPY locks/backend.txt locks/backend.txt" in dockerfile  # setup.sh installs from the lock
    assert "--require-hashes" in (ROOT / "scripts" / "setup.sh").read_text()
    assert "\nUSER freeseg" in dockerfile and "HEALTHCHECK" in dockerfile and "/health" in dockerfile
    assert "MODEL_DIR=/data/models" in dockerfile and "VOLUME /data/models" in dockerfile


@needs_compose
def test_compose_downloads_on_first_start_and_offline_users_can_turn_the_hub_off():
    def environment(**env: str) -> dict:
        shell = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "FREESEG_"))}  # conftest sets some
        result = subprocess.run([COMPOSE, "-f", str(ROOT / "docker-compose.yml"), "config"], capture_output=True,
                                text=True, timeout=60, cwd=ROOT, env={**shell, **env})
        return yaml.safe_load(result.stdout)["services"]["freesegdiff"]["environment"]

    online = environment()
    assert (online["FREESEG_ALLOW_DOWNLOADS"], online["HF_HUB_OFFLINE"]) == ("true", "0")
    assert online["FREESEG_CAPTIONER"] == "auto"  # on a CPU the first start downloads BLIP base, not BLIP-2
    assert float(online["FREESEG_LOAD_WAIT_SECONDS"]) < 100  # under Label Studio's ML_TIMEOUT_PREDICT
    assert environment(HF_HUB_OFFLINE="1")["HF_HUB_OFFLINE"] == "1"
