"""A real `nvflare provision` with zenfed's builder: allow-list, stores in the workspace."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
import yaml

from zenfed.demo import free_port
from zenfed.errors import DeploymentError, SpecError
from zenfed.provisioning.kit_builder import ZenfedKitBuilder
from zenfed.provisioning.project import LAYOUT_FILE, Deployment, flare_project, provision
from zenfed.spec import (
    AdminSpec,
    DatasetLocation,
    ProjectSpec,
    RelaySpec,
    ServerSpec,
    SitePolicy,
    SiteSpec,
    parse_model,
)


def project(fl_port: int, admin_port: int, data: Path, relay_port: int | None = None) -> ProjectSpec:
    """Two sites; with ``relay_port``, bank-b connects through relay-1."""
    relays = (RelaySpec(name="relay-1", port=relay_port),) if relay_port else ()
    return ProjectSpec(
        name="kit-test",
        server=ServerSpec(name="localhost", fl_port=fl_port, admin_port=admin_port),
        relays=relays,
        sites=(
            SiteSpec(
                name="hospital-a",
                org="h",
                torch_threads=1,
                datasets={"builtin": DatasetLocation(path=data / "site-1")},
            ),
            SiteSpec(name="bank-b", org="b", allowed_jobs=("demo-*",), relay="relay-1" if relays else None),
        ),
        admins=(AdminSpec(name="admin@kit.test"),),
    )


@pytest.fixture(scope="module")
def deployment(tmp_path_factory) -> Deployment:
    root = tmp_path_factory.mktemp("provision")
    fl_port = free_port()
    ports = {fl_port}
    while len(ports) < 3:
        ports.add(free_port())
    admin_port, relay_port = sorted(ports - {fl_port})
    return provision(project(fl_port, admin_port, root / "data", relay_port), out=root / "ws")


def test_every_kit_exists_with_its_startup_files(deployment):
    # Assert
    ws = Path(deployment.workspace)
    assert Deployment.load(ws) == deployment
    assert Path(deployment.server_kit, "startup", "fed_server.json").is_file()
    assert set(deployment.site_kits) == {"hospital-a", "bank-b"}
    for kit in deployment.site_kits.values():
        assert Path(kit, "startup", "fed_client.json").is_file()
        assert Path(kit, "startup", "sub_start.sh").is_file()
    assert Path(deployment.admin_kit(), "startup", "fed_admin.json").is_file()
    assert (ws / "project.yml").is_file()


def test_the_server_listens_on_the_provisioned_ports(deployment):
    # Prepare
    config = json.loads(Path(deployment.server_kit, "startup", "fed_server.json").read_text())

    # Assert
    text = json.dumps(config)
    assert str(deployment.fl_port) in text and str(deployment.admin_port) in text


def test_every_kit_allows_zenfed_classes(deployment):
    # Assert
    for kit in (deployment.server_kit, *deployment.site_kits.values()):
        resources = json.loads(Path(kit, "local", "resources.json").read_text())
        assert "zenfed." in resources["class_allow_list"]
        assert resources["class_list_enforcement_mode"] == "enforce"
        assert any(p.startswith("nvflare.") for p in resources["class_allow_list"])


def test_sites_launch_jobs_with_zenfeds_launcher_and_the_server_recovers_interrupted_jobs(deployment):
    # Prepare
    def launchers(kit) -> list[str]:
        resources = json.loads(Path(kit, "local", "resources.json").read_text())
        return [c["path"] for c in resources["components"] if c.get("id") == "process_launcher"]

    # Execute / Assert: a killed site job process is then a lost site, not a failed job
    for kit in deployment.site_kits.values():
        assert launchers(kit) == ["zenfed.executors.site_launcher.SiteJobLauncher"]
    assert launchers(deployment.server_kit) == [
        "nvflare.app_common.job_launcher.server_process_launcher.ServerProcessJobLauncher"]
    server = json.loads(Path(deployment.server_kit, "local", "resources.json").read_text())
    recovery = [c for c in server["components"] if c["id"] == "zenfed_interrupted_jobs"]
    assert [(c["path"], c["args"]) for c in recovery] == [
        ("zenfed.controllers.interrupted_jobs.InterruptedJobRecovery", {"resume": True})]


def test_the_servers_job_and_snapshot_stores_lie_inside_the_workspace(deployment):
    # Prepare
    ws = Path(deployment.workspace).resolve()
    resources = json.loads(Path(deployment.server_kit, "local", "resources.json").read_text())

    # Execute
    job_root = next(c["args"]["uri_root"] for c in resources["components"] if c["id"] == "job_manager")
    snapshot_root = resources["snapshot_persistor"]["args"]["storage"]["args"]["root_dir"]

    # Assert: both live in the server kit that exists after provisioning (not /tmp/nvflare).
    for root in (job_root, snapshot_root):
        assert Path(root).is_relative_to(ws), root
        assert Path(root).is_relative_to(Path(deployment.server_kit).resolve()), root


def test_each_site_policy_is_private_and_parses_for_that_site(deployment, tmp_path):
    # Execute / Assert
    for site, kit in deployment.site_kits.items():
        path = Path(kit, "local", "zenfed_site.yaml")
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        policy = parse_model(SitePolicy, yaml.safe_load(path.read_text()), kind="site policy", source=str(path))
        assert policy.site == site
    hospital = parse_model(
        SitePolicy,
        yaml.safe_load(Path(deployment.site_kits["hospital-a"], "local", "zenfed_site.yaml").read_text()),
        kind="site policy",
        source="test",
    )
    bank = parse_model(
        SitePolicy,
        yaml.safe_load(Path(deployment.site_kits["bank-b"], "local", "zenfed_site.yaml").read_text()),
        kind="site policy",
        source="test",
    )
    assert hospital.torch_threads == 1 and "builtin" in hospital.datasets
    assert bank.allowed_jobs == ("demo-*",) and bank.datasets == {}


def test_no_policy_is_written_to_the_server_or_admin_kits(deployment):
    # Assert
    assert not Path(deployment.server_kit, "local", "zenfed_site.yaml").exists()
    assert not Path(deployment.admin_kit(), "local", "zenfed_site.yaml").exists()


def test_the_flare_project_runs_zenfeds_builder_before_signing(free_ports, tmp_path):
    # Execute
    data = flare_project(project(*free_ports, tmp_path))

    # Assert
    paths = [b["path"] for b in data["builders"]]
    assert paths.index("zenfed.provisioning.kit_builder.ZenfedKitBuilder") < paths.index(
        "nvflare.lighter.impl.signature.SignatureBuilder"
    )
    assert paths[-1] == "nvflare.lighter.impl.signature.SignatureBuilder"
    types = {p["name"]: p["type"] for p in data["participants"]}
    assert types == {
        "localhost": "server",
        "hospital-a": "client",
        "bank-b": "client",
        "admin@kit.test": "admin",
    }


def test_a_bad_site_policy_in_the_builder_is_a_spec_error():
    # Execute / Assert
    with pytest.raises(SpecError, match="torch_threads"):
        ZenfedKitBuilder(site_policies={"a": {"site": "a", "torch_threads": -1}})


def test_a_folder_that_was_not_provisioned_is_refused(tmp_path):
    # Execute / Assert
    with pytest.raises(DeploymentError, match=f"no {LAYOUT_FILE}"):
        Deployment.load(tmp_path)


def test_asking_for_an_unknown_admin_is_refused(deployment):
    # Execute / Assert
    with pytest.raises(DeploymentError, match="no admin named"):
        deployment.admin_kit("nobody@x.org")


def test_every_file_holding_a_key_is_0600_in_a_0700_folder(deployment):
    # Prepare: what holds a secret, found independently of the code under test
    ws = Path(deployment.workspace)
    secret_files = [
        p for p in ws.rglob("*")
        if p.is_file() and (p.suffix == ".key" or p.name == "cert.json" or b"PRIVATE KEY" in p.read_bytes())
    ]

    # Assert: the root CA's state and every kit's keys are among them, each locked down
    names = {p.relative_to(ws).as_posix() for p in secret_files}
    assert any(n.endswith("state/cert.json") for n in names)
    assert any(n.endswith("hospital-a/startup/client.key") for n in names)
    assert any(n.endswith("localhost/startup/server.key") for n in names)
    for path in secret_files:
        assert path.stat().st_mode & 0o777 == 0o600, path
        assert path.parent.stat().st_mode & 0o777 == 0o700, path.parent


def test_a_site_behind_a_relay_reaches_the_server_through_it_with_mutual_tls(deployment):
    # Prepare
    relay_kit = Path(deployment.relay_kits["relay-1"])
    via = json.loads(Path(deployment.site_kits["bank-b"], "local", "relay__resources.json").read_text())
    relay = json.loads((relay_kit / "startup" / "fed_relay.json").read_text())
    listener = json.loads((relay_kit / "local" / "comm_config.json").read_text())["internal"]

    # Assert: bank-b dials the relay, on loopback, with mutual TLS; hospital-a dials the server
    port = deployment.relay_ports["relay-1"]
    assert via["relay_config"]["address"] == f"localhost:{port}"
    assert via["relay_config"]["connection_security"] == "mtls"
    assert listener["resources"]["host"] == "localhost" and listener["resources"]["port"] == port
    assert listener["resources"]["connection_security"] == "mtls"
    assert not Path(deployment.site_kits["hospital-a"], "local", "relay__resources.json").exists()
    # The relay connects on to the server, and holds no site policy, CKKS context or data
    assert relay["connect_to"]["address"] == f"localhost:{deployment.fl_port}"
    held = {p.name for p in relay_kit.rglob("*") if p.is_file()}
    assert not held & {"zenfed_site.yaml", "zenfed_he_site.context", "zenfed_he_server.context"}
    assert {"client.key", "rootCA.pem"} <= held


@pytest.mark.parametrize(("change", "message"), [
    ({"sites": [{"name": "s", "relay": "nowhere"}]}, "relay 'nowhere', which is not among"),
    ({"relays": [{"name": "r", "port": 8002}]}, "relay's port must differ from the server's"),
    ({"relays": [{"name": "s", "port": 9100}]}, "repeated: s"),
])
def test_a_relay_the_project_lacks_or_a_clashing_port_is_a_spec_error(change, message):
    # Prepare
    data = {"name": "p", "sites": [{"name": "s"}], "admins": [{"name": "a@b.c"}], **change}

    # Execute / Assert
    with pytest.raises(SpecError, match=message):
        parse_model(ProjectSpec, data, kind="project", source="test")
