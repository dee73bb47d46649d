"""The manifest builders as plain data: no cluster, no emulator."""

from __future__ import annotations

import base64
import re

import pytest

from agent_clients.backends import egress as eg
from agent_clients.backends import k8s_manifests as m
from agent_clients.backends.base import BackendError, SessionSpec

DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def spec(**kw):
    base = dict(
        session_id="3f2a6c1e-9d4b-4f7a-8e21-0c5d9b7a1e44",
        owner="alice",
        image="streamspace/desktop:bookworm-3",
        vnc_port=5901,
        cpu=1.5,
        memory_mb=2048,
        env={"RESOLUTION": "1280x800", "TZ": "UTC"},
        home_path="/home/user",
        vnc_password="s3cret!!",
        template="desktop",
    )
    base.update(kw)
    return SessionSpec(**base)


def all_names(s):
    return [
        m.deployment_name(s.session_id),
        m.service_name(s.session_id),
        m.secret_name(s.session_id),
        m.pvc_name(s.session_id),
    ]


def test_deployment_shape():
    s = spec()
    dep = m.make_deployment(s, "agent-1", "streamspace")
    assert dep["apiVersion"] == "apps/v1" and dep["kind"] == "Deployment"
    assert dep["metadata"]["namespace"] == "streamspace"
    assert dep["spec"]["replicas"] == 1
    assert dep["spec"]["strategy"] == {"type": "Recreate"}
    labels = dep["metadata"]["labels"]
    assert labels == {
        "app.kubernetes.io/managed-by": "streamspace",
        "streamspace.io/session": s.session_id,
        "streamspace.io/owner": "alice",
        "streamspace.io/agent": "agent-1",
    }
    # The selector picks the pod template's labels, and only this session's.
    selector = dep["spec"]["selector"]["matchLabels"]
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= pod_labels.items()
    assert selector["streamspace.io/session"] == s.session_id

    pod = dep["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    (c,) = pod["containers"]
    assert c["image"] == "streamspace/desktop:bookworm-3"
    assert c["ports"] == [{"name": "vnc", "containerPort": 5901, "protocol": "TCP"}]
    assert c["resources"] == {
        "requests": {"cpu": "1500m", "memory": "2048Mi"},
        "limits": {"cpu": "1500m", "memory": "2048Mi"},
    }
    env = {e["name"]: e for e in c["env"]}
    assert env["RESOLUTION"] == {"name": "RESOLUTION", "value": "1280x800"}
    assert env["TZ"]["value"] == "UTC"
    assert env["VNC_PASSWORD"] == {
        "name": "VNC_PASSWORD",
        "valueFrom": {"secretKeyRef": {"name": m.secret_name(s.session_id), "key": "VNC_PASSWORD"}},
    }
    assert "s3cret" not in repr(dep), "the password lives only in the Secret"
    assert c["readinessProbe"]["tcpSocket"] == {"port": 5901}
    assert c["volumeMounts"] == [{"name": "home", "mountPath": "/home/user"}]
    assert pod["volumes"] == [{"name": "home", "persistentVolumeClaim": {"claimName": m.pvc_name(s.session_id)}}]


def test_hibernated_deployment_has_zero_replicas():
    assert m.make_deployment(spec(), "a", "ns", hibernated=True)["spec"]["replicas"] == 0


def test_template_cannot_override_the_password_env():
    dep = m.make_deployment(spec(env={"VNC_PASSWORD": "plain"}), "a", "ns")
    entries = [e for e in dep["spec"]["template"]["spec"]["containers"][0]["env"] if e["name"] == "VNC_PASSWORD"]
    assert entries == [
        {
            "name": "VNC_PASSWORD",
            "valueFrom": {"secretKeyRef": {"name": m.secret_name(spec().session_id), "key": "VNC_PASSWORD"}},
        }
    ]


def test_secret_service_pvc():
    s = spec()
    secret = m.make_secret(s, "agent-1", "ns")
    assert secret["kind"] == "Secret" and secret["type"] == "Opaque"
    assert base64.b64decode(secret["data"]["VNC_PASSWORD"]).decode() == "s3cret!!"
    svc = m.make_service(s, "agent-1", "ns")
    assert svc["spec"]["type"] == "ClusterIP"
    assert svc["spec"]["ports"] == [{"name": "vnc", "port": 5901, "targetPort": "vnc", "protocol": "TCP"}]
    assert svc["spec"]["selector"] == m.session_selector(s.session_id)
    pvc = m.make_pvc(s, "agent-1", "ns", size="5Gi", storage_class="fast")
    assert pvc["spec"] == {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": "5Gi"}},
        "storageClassName": "fast",
    }
    assert m.make_pvc(s, "a", "ns")["spec"]["resources"]["requests"]["storage"] == m.DEFAULT_HOME_SIZE
    assert "storageClassName" not in m.make_pvc(s, "a", "ns")["spec"]
    for obj in m.make_all(s, "agent-1", "ns"):
        assert obj["metadata"]["labels"]["streamspace.io/agent"] == "agent-1"
        assert obj["metadata"]["annotations"]["streamspace.io/session-id"] == s.session_id
    assert [o["kind"] for o in m.make_all(s, "a", "ns")] == [
        "NetworkPolicy", "Secret", "PersistentVolumeClaim", "Service", "Deployment",
    ]  # fmt: skip


NASTY = [
    "3F2A6C1E-9D4B-4F7A-8E21-0C5D9B7A1E44",
    "Ünïcode.User@Example.COM",
    "x" * 300,
    "-leading-and-trailing-",
    "___",
    "a/b:c d\te\n",
    "🙂" * 40,
    "9starts-with-digit",
    "",
]


@pytest.mark.parametrize("raw", NASTY)
def test_names_and_labels_are_valid_for_any_input(raw):
    s = spec(session_id=raw or "x", owner=raw, template=raw)
    for name in all_names(s):
        assert len(name) <= 63 and DNS_LABEL.match(name), name
    for obj in m.make_all(s, raw or "agent", "ns"):
        for value in obj["metadata"]["labels"].values():
            assert len(value) <= 63 and LABEL_VALUE.match(value), value
    # Deterministic: the same input gives the same names.
    assert all_names(s) == all_names(spec(session_id=raw or "x"))


def test_sanitised_names_do_not_collide():
    ids = [
        "User.One",
        "user-one",
        "USER_ONE",
        "x" * 300,
        "x" * 299 + "y",
        "Ünïcode.User@Example.COM",
        "nicode-user-example-com",
    ]
    names = {m.deployment_name(i) for i in ids}
    assert len(names) == len(ids)
    owners = {m.label_value(i) for i in ids}
    assert len(owners) == len(ids)


def test_clean_ids_keep_their_readable_form():
    assert m.deployment_name("abc-123") == "ss-abc-123"
    assert m.pvc_name("abc-123") == "ss-abc-123-home"
    assert m.secret_name("abc-123") == "ss-abc-123-vnc"
    assert m.label_value("alice") == "alice"


@pytest.mark.parametrize(
    "image",
    ["", "   ", "UPPER/case", "bad image", "img:tag:tag", "img@sha256:short", "http://registry/img", "a" * 600, "img:"],
)
def test_invalid_images_rejected(image):
    with pytest.raises(BackendError) as err:
        m.make_all(spec(image=image), "a", "ns")
    assert err.value.retryable is False
    assert "invalid image reference" in err.value.message


@pytest.mark.parametrize(
    "image",
    [
        "debian",
        "streamspace/desktop:bookworm-3",
        "registry.example.com:5000/team/desktop:1.2.3",
        "localhost/desktop",
        "ghcr.io/org/img@sha256:" + "a" * 64,
    ],
)
def test_valid_images_accepted(image):
    assert (
        m.make_deployment(spec(image=image), "a", "ns")["spec"]["template"]["spec"]["containers"][0]["image"] == image
    )


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("cpu", 0, "cpu"),
        ("cpu", -1, "cpu"),
        ("cpu", 65, "cpu"),
        ("cpu", float("nan"), "cpu"),
        ("cpu", 0.0001, "cpu"),
        ("memory_mb", 63, "memory"),
        ("memory_mb", 256 * 1024 + 1, "memory"),
        ("memory_mb", -5, "memory"),
        ("vnc_port", 0, "VNC port"),
        ("vnc_port", 70000, "VNC port"),
        ("home_path", "relative/home", "home path"),
        ("home_path", "/", "home path"),
        ("env", {"BAD NAME": "x"}, "environment variable"),
    ],
)
def test_absurd_limits_rejected(field, value, words):
    with pytest.raises(BackendError) as err:
        m.make_all(spec(**{field: value}), "a", "ns")
    assert err.value.retryable is False
    assert words in err.value.message


def test_limits_at_the_edges_accepted():
    m.make_all(spec(cpu=64, memory_mb=256 * 1024), "a", "ns")
    m.make_all(spec(cpu=0.1, memory_mb=64), "a", "ns")


def test_bad_home_size_rejected():
    with pytest.raises(BackendError, match="home volume size"):
        m.make_all(spec(), "a", "ns", home_size="ten gigs")


# --- the egress NetworkPolicy -------------------------------------------------------------

PRIVATE_AND_SPECIAL = [
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.0.0.0/24", "192.168.0.0/16", "224.0.0.0/4", "240.0.0.0/4",
]  # fmt: skip
KUBE_DNS = {
    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
    "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
}


def policy(**kw):
    proxy = kw.pop("proxy", None)
    s = spec(**kw)
    obj = m.make_all(s, "a", "ns", egress_proxy=proxy)[0]
    assert obj["kind"] == "NetworkPolicy" and obj["apiVersion"] == "networking.k8s.io/v1"
    assert obj["metadata"]["name"] == m.network_policy_name(s.session_id)
    assert DNS_LABEL.match(obj["metadata"]["name"]) and len(obj["metadata"]["name"]) <= 63
    # It selects exactly the session's pods (the Deployment's selector) and limits egress only.
    deployment = m.make_deployment(s, "a", "ns", egress_proxy=proxy)
    assert obj["spec"]["podSelector"] == deployment["spec"]["selector"]
    assert obj["spec"]["policyTypes"] == ["Egress"]
    return obj["spec"]["egress"], deployment


def test_internet_policy_is_the_world_but_private_ranges_plus_kube_dns():
    egress, _ = policy()
    assert egress == [
        {"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": PRIVATE_AND_SPECIAL}}]},
        {"to": [KUBE_DNS], "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]},
    ]


def test_none_policy_allows_nothing():
    egress, _ = policy(egress="none")
    assert egress == []  # policyTypes Egress with no rule: every egress is denied


def test_proxy_policy_allows_the_proxy_only_and_sets_the_proxy_env():
    egress, deployment = policy(egress="proxy", proxy=("203.0.113.5", 3128))
    assert egress == [{"to": [{"ipBlock": {"cidr": "203.0.113.5/32"}}], "ports": [{"protocol": "TCP", "port": 3128}]}]
    env = {e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["HTTPS_PROXY"] == env["HTTP_PROXY"] == "http://203.0.113.5:3128"


def test_proxy_policy_without_a_proxy_is_refused():
    with pytest.raises(BackendError, match="EGRESS_PROXY"):
        m.make_all(spec(egress="proxy"), "a", "ns")


def test_allow_entries_add_rules_in_any_mode():
    egress, _ = policy(egress="none", egress_allow=("10.1.2.3", "192.168.7.0/24:443", "8443"))
    both = [{"protocol": "TCP", "port": 443}, {"protocol": "UDP", "port": 443}]
    assert egress == [
        {"to": [{"ipBlock": {"cidr": "10.1.2.3/32"}}]},
        {"to": [{"ipBlock": {"cidr": "192.168.7.0/24"}}], "ports": both},
        {  # a bare port: public addresses only (found by review: it opened the metadata service)
            "to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": list(eg.BLOCKED_V4)}}],
            "ports": [{"protocol": "TCP", "port": 8443}, {"protocol": "UDP", "port": 8443}],
        },
    ]


@pytest.mark.parametrize(
    "field,value,words",
    [("egress", "sometimes", "egress must be one of"), ("egress_allow", ("example.com:443",), "IPv4 address or CIDR")],
)
def test_a_bad_egress_policy_is_refused(field, value, words):
    with pytest.raises(BackendError, match=words):
        m.make_all(spec(**{field: value}), "a", "ns")


def test_the_policy_loads_strictly_into_the_client_models():
    from tests.k8s.test_rbac import load

    for kw in ({}, {"egress": "none"}, {"egress": "proxy", "proxy": ("203.0.113.5", 3128)}, {"egress_allow": ("443",)}):
        proxy = kw.pop("proxy", None)
        load(m.make_network_policy(spec(**kw), "a", "ns", egress_proxy=proxy))
