"""infra/ checked statically (no Docker engine or cluster on CI machines): the compose file and the
Kubernetes manifests parse, pin every image, take every secret from the environment / a Secret, and
give every server its ports and health checks."""

from __future__ import annotations

import re

import pytest
import yaml

from .conftest import ROOT

INFRA = ROOT / "infra"
SECRET_WORDS = ("PASSWORD", "SECRET", "ACCESS_KEY", "_USER", "TOKEN")
LOOPBACK = "${BIND_ADDRESS:-127.0.0.1}"  # every published port: this machine only, unless BIND_ADDRESS says otherwise
PINNED = re.compile(r"^[\w./-]+:(?!latest$)[\w.-]*\d[\w.-]*$")  # name:tag, the tag has a version number


def compose() -> dict:
    return yaml.safe_load((INFRA / "compose.yaml").read_text())


def k8s_docs() -> list[dict]:
    docs = []
    for path in sorted((INFRA / "k8s").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def containers(doc: dict) -> list[dict]:
    spec = doc.get("spec", {})
    pod = spec.get("template", {}).get("spec", {}) or spec.get("jobTemplate", {}).get("spec", {}).get("template", {}).get("spec", {})
    return pod.get("containers", [])


def test_compose_has_the_services_with_pinned_images():
    services = compose()["services"]
    assert {"postgres", "minio", "mlflow", "prefect-server", "prefect-worker", "serve", "promotion-hook"} <= set(services)
    for name, svc in services.items():
        assert "image" in svc, name
        assert PINNED.match(svc["image"]), f"{name}: image {svc['image']!r} is not pinned to a version tag"
    for dockerfile in INFRA.rglob("Dockerfile"):
        for line in dockerfile.read_text().splitlines():
            if line.startswith("FROM "):
                assert PINNED.match(line.split()[1]), f"{dockerfile}: {line}"


def test_compose_takes_every_secret_from_the_env_file_without_defaults():
    text = (INFRA / "compose.yaml").read_text()
    example = (INFRA / ".env.example").read_text()
    for name, svc in compose()["services"].items():
        env = svc.get("environment", {})
        for key, value in env.items():
            if any(w in key for w in SECRET_WORDS):
                assert re.fullmatch(r"\$\{(\w+):\?[^}]+\}", str(value)), f"{name}.{key} = {value!r}: not a required env var"
    required = set(re.findall(r"\$\{(\w+):\?", text))
    declared = set(re.findall(r"^(\w+)=", example, flags=re.M))
    assert required <= declared, f"missing from .env.example: {required - declared}"
    for line in example.splitlines():
        if "PASSWORD=" in line:
            assert line.endswith("="), f".env.example must not carry a password: {line}"
    assert ".env" in (INFRA / ".gitignore").read_text().split()


def test_compose_servers_have_ports_and_healthchecks():
    services = compose()["services"]
    for name in ("postgres", "minio", "mlflow", "prefect-server", "prefect-worker", "serve", "promotion-hook"):
        assert services[name].get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    assert services["serve"]["ports"] == [f"{LOOPBACK}:8000:8000"]
    assert services["promotion-hook"]["ports"] == [f"{LOOPBACK}:8100:8100"]
    assert services["mlflow"]["environment"]["MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY"].startswith("${")
    for name, port in (("minio", "9000:9000"), ("mlflow", "5000:5000"), ("prefect-server", "4200:4200")):
        assert f"{LOOPBACK}:{port}" in services[name]["ports"], name
    command = " ".join(services["mlflow"]["command"])
    for flag in ("export MLFLOW_BACKEND_STORE_URI=\"postgresql", "--artifacts-destination s3://", "--serve-artifacts",
                 "--allowed-hosts", "--app-name basic-auth"):
        assert flag in command, flag
    auth = (INFRA / "mlflow/basic_auth.ini.template").read_text()
    assert "admin_password = ${MLFLOW_ADMIN_PASSWORD}" in auth  # never MLflow's default password
    assert "postgresql+asyncpg://" in services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert "prefect worker start --pool headstart --type process" in " ".join(services["prefect-worker"]["command"])


def test_k8s_manifests_parse_and_pin_images_and_read_secrets_from_a_secret():
    docs = k8s_docs()
    kinds = {(d["kind"], d["metadata"].get("name") or d["metadata"].get("generateName")) for d in docs}
    for needed in [("Deployment", "mlflow"), ("Deployment", "prefect-server"), ("Deployment", "prefect-worker"),
                   ("StatefulSet", "postgres"), ("Deployment", "minio"), ("Job", "headstart-finetune-"),
                   ("Deployment", "serve")]:
        assert needed in kinds, needed
    for doc in docs:
        for c in containers(doc):
            assert PINNED.match(c["image"]), f"{doc['metadata']}: {c['image']}"
            for env in c.get("env", []):
                if any(w in env["name"] for w in SECRET_WORDS):
                    assert env.get("valueFrom", {}).get("secretKeyRef", {}).get("name") == "headstart-secrets", env
                    assert "value" not in env, env


@pytest.mark.parametrize("name, port", [("mlflow", 5000), ("prefect-server", 4200), ("postgres", 5432), ("minio", 9000),
                                        ("serve", 8000), ("promotion-hook", 8100)])
def test_k8s_servers_have_services_ports_and_probes(name, port):
    docs = k8s_docs()
    workload = next(d for d in docs if d["kind"] in ("Deployment", "StatefulSet") and d["metadata"]["name"] == name)
    (c,) = containers(workload)
    assert port in [p["containerPort"] for p in c["ports"]]
    assert c.get("readinessProbe") and c.get("livenessProbe"), name
    service = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == name)
    assert port in [p["port"] for p in service["spec"]["ports"]]


def test_k8s_has_a_kubernetes_work_pool_and_a_torchrun_training_job():
    docs = k8s_docs()
    worker = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "prefect-worker")
    assert "--type kubernetes" in " ".join(containers(worker)[0]["args"])
    job = next(d for d in docs if d["kind"] == "Job" and d["metadata"].get("generateName") == "headstart-finetune-")
    (c,) = containers(job)
    cmd = c["command"]
    assert cmd[:3] == ["python", "-m", "torch.distributed.run"] and cmd[-2:] == ["-m", "stages.finetune"]
    nproc = int(next(a for a in cmd if a.startswith("--nproc_per_node=")).split("=")[1])
    assert c["resources"]["limits"]["nvidia.com/gpu"] == nproc


def test_dvc_remote_on_minio_is_configured_but_not_the_default():
    config = (ROOT / ".dvc/config").read_text()
    assert "['remote \"minio\"']" in config and "url = s3://dvc" in config
    assert "endpointurl = http://localhost:9000" in config
    assert "remote = minio" not in config  # a fresh clone must not try to push to a server it lacks


def dockerignored(path: str, rules: list[str]) -> bool:
    """Docker's .dockerignore semantics: patterns relative to the context root (`*` within a name, `**` across
    folders), a matching folder takes everything in it, `!` re-includes, the last matching rule wins."""
    def regex(pattern: str) -> re.Pattern:
        out, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            else:
                out += {"*": "[^/]*", "?": "[^/]"}.get(pattern[i], re.escape(pattern[i]))
                i += 1
        return re.compile(out)

    parts = path.split("/")
    prefixes = ["/".join(parts[:k]) for k in range(1, len(parts) + 1)]
    excluded = False
    for rule in rules:
        negate = rule.startswith("!")
        pattern = rule.lstrip("!").strip("/")
        if any(regex(pattern).fullmatch(p) for p in prefixes):
            excluded = not negate
    return excluded


def test_worker_image_build_context_leaves_out_local_state_and_secrets():
    """The worker image is `COPY . .` of the build context: what .dockerignore leaves in is what ships."""
    import subprocess

    rules = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    for path in (".dvc/config.local", ".env", ".env.production", "infra/.env", "infra/.env.local", "mlflow.db",
                 "mlruns/0/meta.yaml", "mlartifacts/1/abc/artifacts/model.onnx", ".dvc/cache/files/md5/ab/cdef",
                 ".dvc/tmp/lock", "data/prepared/train.safetensors", "models/onnx/model.onnx", ".venv/bin/python",
                 ".git/config", "stages/__pycache__/train.cpython-311.pyc", "checkpoints/finetune/state.pt",
                 "reports/registered.json"):
        assert dockerignored(path, rules), f"{path} would be copied into the worker image"
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    shipped = {f for f in tracked if not dockerignored(f, rules)}
    assert {"stages/train.py", "flows/pipeline.py", "dvc.yaml", "params.yaml", "requirements.lock"} <= shipped
    assert not {f for f in shipped if f.endswith(".env") or "/.env" in f or f.startswith(".env")}


SECRET_VALUE = re.compile(r"\$\$?\{?(\w*(?:PASSWORD|SECRET|TOKEN|AUTH_STRING)\w*)")  # key ids and user names are not secret


def _commands() -> dict[str, str]:
    """Every command line the infra runs: compose commands, entrypoints and health checks; k8s containers'
    command, args and exec probes."""
    found = {}
    for name, svc in compose()["services"].items():
        for key in ("command", "entrypoint"):
            if key in svc:
                found[f"compose {name} {key}"] = " ".join(svc[key]) if isinstance(svc[key], list) else svc[key]
        if "healthcheck" in svc:
            found[f"compose {name} healthcheck"] = " ".join(svc["healthcheck"]["test"])
    for doc in k8s_docs():
        for c in containers(doc):
            parts = [*c.get("command", []), *c.get("args", [])]
            for probe in ("readinessProbe", "livenessProbe"):
                parts += c.get(probe, {}).get("exec", {}).get("command", [])
            found[f"k8s {doc['metadata'].get('name') or doc['metadata'].get('generateName')} {c['name']}"] = " ".join(parts)
    return found


def test_no_secret_is_ever_on_a_command_line():
    """A secret may reach a program through its environment or a file, never its argv (readable with ps):
    in a shell script a secret variable is only expanded into an `export` or piped from printf (builtins)."""
    for where, text in _commands().items():
        text = re.sub(r"export \w+=\"[^\"]*\"", "", text)
        text = re.sub(r"printf '%s\\n' \"\$\$?\{?\w+\}?\" \|", "", text)
        assert not SECRET_VALUE.search(text), f"{where}: {SECRET_VALUE.search(text).group(0)} on a command line"


def test_published_ports_listen_on_loopback_unless_told_otherwise():
    for name, svc in compose()["services"].items():
        for port in svc.get("ports", []):
            assert port.startswith(f"{LOOPBACK}:"), f"{name}: {port} listens on every interface"


def test_the_prefect_api_requires_authentication():
    services = compose()["services"]
    assert services["prefect-server"]["environment"]["PREFECT_SERVER_API_AUTH_STRING"].startswith("${PREFECT_AUTH_STRING:?")
    assert services["prefect-worker"]["environment"]["PREFECT_API_AUTH_STRING"].startswith("${PREFECT_AUTH_STRING:?")
    docs = k8s_docs()
    for name, var in (("prefect-server", "PREFECT_SERVER_API_AUTH_STRING"), ("prefect-worker", "PREFECT_API_AUTH_STRING")):
        workload = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == name)
        env = {e["name"]: e for e in containers(workload)[0]["env"]}
        assert env[var]["valueFrom"]["secretKeyRef"]["key"] == "PREFECT_AUTH_STRING", name


def test_the_pipeline_and_the_model_server_use_their_own_accounts():
    """Least privilege: MinIO's root and the MLflow admin are used only to create the other accounts."""
    services = compose()["services"]
    for name, svc in services.items():
        env = " ".join(str(v) for v in svc.get("environment", {}).values()) if isinstance(svc.get("environment"), dict) else ""
        if "MINIO_ROOT" in env:
            assert name in ("minio", "minio-buckets"), name
        if "MLFLOW_ADMIN" in env:
            assert name in ("mlflow", "mlflow-users"), name
    worker, serve = services["prefect-worker"]["environment"], services["serve"]["environment"]
    assert "MLFLOW_PIPELINE_USERNAME" in worker["MLFLOW_TRACKING_USERNAME"] and "S3_ACCESS_KEY" in worker["AWS_ACCESS_KEY_ID"]
    assert "MLFLOW_SERVE_USERNAME" in serve["MLFLOW_TRACKING_USERNAME"] and "AWS_ACCESS_KEY_ID" not in serve
    for doc in k8s_docs():
        for c in containers(doc):
            keys = {e.get("valueFrom", {}).get("secretKeyRef", {}).get("key", "") for e in c.get("env", [])}
            name = doc["metadata"].get("name") or doc["metadata"].get("generateName")
            if any(k.startswith("MINIO_ROOT") for k in keys):
                assert name in ("minio", "minio-buckets"), name
            if any(k.startswith("MLFLOW_ADMIN") for k in keys):
                assert name in ("mlflow", "mlflow-users"), name


def test_rendered_secret_files_are_readable_by_their_owner_only():
    for where, text in _commands().items():
        if "basic_auth.ini'" in text and "expandvars" in text:  # the MLflow auth file, with a database password
            assert "os.open('/tmp/basic_auth.ini', os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)" in text, where


def test_the_serving_image_holds_what_the_server_imports_and_no_torch():
    """infra/serve: its requirements are requirements.lock's versions without torch, and its Dockerfile copies
    every headstart module the server loads (found by importing the server, not by reading a list)."""
    import subprocess
    import sys

    lock = {line.split("==")[0].lower(): line.strip() for line in (ROOT / "requirements.lock").read_text().splitlines()
            if "==" in line}
    wanted = [line.strip() for line in (INFRA / "serve/requirements.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    for pin in wanted:
        assert lock.get(pin.split("==")[0].lower()) == pin, f"{pin}: requirements.lock has {lock.get(pin.split('==')[0].lower())}"
    assert not {"torch", "transformers", "torchvision", "timm"} & {p.split("==")[0].lower() for p in wanted}
    code = ("import sys, ops.serve, stages.registry; from stages.params import Params; Params.load(); "
            "print(' '.join(sorted(sys.modules)))")
    loaded = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True, text=True).stdout.split()
    assert not {"torch", "transformers", "sklearn", "prefect"} & set(loaded)
    ours = {m.replace(".", "/") + ".py" for m in loaded if m.split(".")[0] in ("stages", "flows", "ops") and "." in m}
    copied = " ".join(line for line in (INFRA / "serve/Dockerfile").read_text().splitlines() if line.startswith("COPY"))
    missing = sorted(f for f in ours if f not in copied.split())
    assert not missing, f"the server loads {missing}, which infra/serve/Dockerfile does not copy"
