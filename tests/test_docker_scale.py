"""docker/compose.scale.yaml and docker/nginx.scale.conf: PostgreSQL, two replicas on one shared data
volume and nginx with the consistent hash of docs/deployment.md#scaling-past-one-gpu, with health
checks. Checked as YAML, then by `docker compose config` (the dev extras' Compose binary) and, when
nginx is installed, by `nginx -t`; no Docker engine is needed."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from rwkv_gateway.settings import Settings
from support import free_port
from test_docker import (
    DOCKER,
    HEALTHCHECK,
    ROOT,
    compose,
    compose_config,
    deployment_nginx_blocks,
    environment,
    load,
    nginx_conf,
    published,
    seconds,
    settings_from,
    volume_mounts,
)

__all__ = ["compose"]  # the fixture, used by name

SCALE = DOCKER / "compose.scale.yaml"
NGINX = DOCKER / "nginx.scale.conf"
REPLICAS = ("gateway-1", "gateway-2")
ENV = {"RWKV_POSTGRES_PASSWORD": "s3cret"}


def check_scale(config: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    services = config["services"]
    assert set(services) == {"postgres", *REPLICAS, "nginx"}
    pg = services["postgres"]
    assert environment(pg)["POSTGRES_PASSWORD"] == "s3cret"
    assert "pg_isready" in pg["healthcheck"]["test"]
    assert volume_mounts(pg)["/var/lib/postgresql"]["type"] == "volume"
    assert "ports" not in pg  # reachable on the Compose network only
    fields = {f"RWKV_GATEWAY_{name.upper()}" for name in Settings.model_fields}
    shared = set()
    for name in REPLICAS:
        svc = services[name]
        env = environment(svc)
        assert {k for k in env if k.startswith("RWKV_")} <= fields
        settings = settings_from(env, monkeypatch)
        assert settings.database_url == "postgresql+asyncpg://gateway:s3cret@postgres:5432/gateway"
        assert settings.db_pool_size == 5
        assert svc["healthcheck"]["test"] == ["CMD", "python3", HEALTHCHECK]
        assert svc["depends_on"]["postgres"]["condition"] == "service_healthy"
        assert seconds(svc["stop_grace_period"]) >= settings.drain_timeout_s + 10
        assert "ports" not in svc  # only through nginx
        data = volume_mounts(svc)["/data"]
        assert data["type"] == "volume"
        shared.add(data["source"])
    assert len(shared) == 1  # one data volume for both replicas
    proxy = services["nginx"]
    assert published(proxy) == {80: ("127.0.0.1", "8000")}
    conf = volume_mounts(proxy)["/etc/nginx/conf.d/default.conf"]
    assert conf["read_only"] is True and Path(conf["source"]).name == NGINX.name
    assert set(proxy["depends_on"]) == set(REPLICAS)


def test_scale_compose_file(monkeypatch: pytest.MonkeyPatch) -> None:
    check_scale(load(SCALE, env=ENV), monkeypatch)


def test_scale_compose_needs_a_database_password() -> None:
    with pytest.raises(AssertionError, match="RWKV_POSTGRES_PASSWORD"):
        load(SCALE)


def test_docker_compose_config_of_the_scale_file(compose: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    config = compose_config(compose, SCALE, cwd=DOCKER, env=ENV)
    assert config["name"] == "rwkv-gateway-scale"
    check_scale(config, monkeypatch)
    conf = volume_mounts(config["services"]["nginx"])["/etc/nginx/conf.d/default.conf"]
    assert Path(conf["source"]) == NGINX
    assert (Path(config["services"]["gateway-1"]["build"]["context"])).resolve() == ROOT


def test_the_proxy_hashes_as_the_docs_say() -> None:
    """The nginx file carries the docs' affinity maps and hash, over the two replicas."""
    conf = NGINX.read_text()
    scaling = deployment_nginx_blocks()[1]
    for line in scaling.splitlines():
        if line.startswith("map ") or "hash $affinity_key consistent;" in line:
            assert line.strip() in conf, line
    assert re.findall(r"server (gateway-\d):8000", conf) == list(REPLICAS)


def test_the_proxy_config_is_valid_nginx(tmp_path: Path) -> None:
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        pytest.skip("nginx is not installed")
    # Outside Compose the replicas' names do not resolve: point them at local ports.
    body = NGINX.read_text().replace("listen 80;", f"listen 127.0.0.1:{free_port()};")
    for name in REPLICAS:
        body = body.replace(f"{name}:8000", f"127.0.0.1:{free_port()}")
    out = subprocess.run(
        [found, "-t", "-p", str(tmp_path), "-c", str(nginx_conf(tmp_path, body))],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
