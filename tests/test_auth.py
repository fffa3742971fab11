"""TLS, mutual TLS, bearer tokens and session ownership (issue 9), over real gRPC on
127.0.0.1 with a CA and certificates made here."""
from __future__ import annotations

import contextlib
import datetime
import io
import ipaddress
import json
import re
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

import gradgate as gg
from gradgate import codec
from gradgate.v1 import gradient_service_pb2 as pb
from gradgate.v1 import gradient_service_pb2_grpc as pb_grpc
from gradgate_server import Config, serve
from gradgate_server.auth import ANONYMOUS, Authenticator, Principal, load_tokens, principal
from gradgate_server.metrics import Metrics
from gradgate_server.rpc import SERVICE, Streams, gradient_service_handlers

from obs import GRADIENT_SERVICE, Scrape
from procs import ServerProcess
from test_server_e2e import batch, create, forward_request

Code = grpc.StatusCode
TOKENS = {"alice": "tok-alice-0123456789", "alice2": "tok-alice-second-key", "bob": "tok-bob-9876543210"}


# -- certificates ---------------------------------------------------------------------

def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "gradgate tests"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject: str, issuer: tuple | None, *, ca: bool = False, server: bool = False) -> tuple:
    """(cert, key) for ``subject``, signed by ``issuer`` = (cert, key), or self-signed."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(subject))
               .issuer_name(issuer[0].subject if issuer else _name(subject))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    if ca:
        builder = builder.add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                      content_commitment=False, key_encipherment=False,
                                                      data_encipherment=False, key_agreement=False,
                                                      encipher_only=False, decipher_only=False), critical=True)
    return builder.sign(issuer[1] if issuer else key, hashes.SHA256()), key


def _pem(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> tuple[bytes, bytes]:
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and localhost, client certificates for
    alice and bob, and a rogue CA's client certificate; all PEM files."""
    d = tmp_path_factory.mktemp("pki")
    ca = _cert("gradgate test CA", None, ca=True)
    rogue = _cert("rogue CA", None, ca=True)
    files: dict[str, Path] = {}
    for name, (cert, key) in {"ca": ca, "server": _cert("gradgate server", ca, server=True),
                              "alice": _cert("alice", ca), "bob": _cert("bob", ca),
                              "mallory": _cert("alice", rogue), "rogue": rogue}.items():
        cert_pem, key_pem = _pem(cert, key)
        (d / f"{name}.pem").write_bytes(cert_pem)
        (d / f"{name}.key").write_bytes(key_pem)
        files[name], files[f"{name}.key"] = d / f"{name}.pem", d / f"{name}.key"
    tokens = d / "tokens.csv"
    tokens.write_text(f'{TOKENS["alice"]},alice,1001,"ml,admins"\n{TOKENS["alice2"]},alice,1001\n'
                      f'\n# bob can only train\n{TOKENS["bob"]},bob,1002,ml\n')
    files["tokens"] = tokens
    return files


# -- the token file ---------------------------------------------------------------------

def test_static_token_file_is_parsed_like_kubernetes(pki, tmp_path) -> None:
    tokens = load_tokens(pki["tokens"])
    assert sorted(tokens.values(), key=lambda p: p.groups) == [
        Principal("alice", "1001", ()), Principal("bob", "1002", ("ml",)), Principal("alice", "1001", ("ml", "admins"))]
    assert TOKENS["alice"].encode() not in b"".join(tokens)  # held as hashes only
    for text, words in (("tok,\n", "line 1: expected token,user"), ("a,b\na,c\n", "line 2: duplicate token"),
                        ("", "no tokens"), ("t,u,1,g,extra\n", "line 1")):
        bad = tmp_path / "bad.csv"
        bad.write_text(text)
        with pytest.raises(ValueError, match=words):
            load_tokens(bad)


# -- bearer tokens --------------------------------------------------------------------

@pytest.fixture(scope="module")
def token_server(pki) -> Iterator:
    with serve("127.0.0.1:0", Config(auth_tokens=str(pki["tokens"]), metrics_port=0)) as srv:
        yield srv


def stub_for(address: str, token: str | None = None, credentials: grpc.ChannelCredentials | None = None):
    channel = (grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address))
    metadata = [("authorization", f"Bearer {token}")] if token else None
    stub = pb_grpc.GradientServiceStub(channel)

    class Authed:
        def __getattr__(self, method: str):
            call = getattr(stub, method)
            return lambda request, timeout=10: call(request, timeout=timeout, metadata=metadata)
    return Authed(), channel


def code_of(call, request) -> tuple[grpc.StatusCode, str]:
    try:
        call(request)
    except grpc.RpcError as e:
        return e.code(), e.details()
    return Code.OK, ""


def every_call(sid: str) -> list[tuple[str, object]]:
    forward = forward_request(sid, batch())
    fb = pb.ForwardBackwardRequest(session_id=sid, inputs=forward.inputs)
    set_params = pb.SetParametersRequest(session_id=sid)
    codec.to_tensor_map({"W": np.zeros((2, 3))}, set_params.params)
    return [("Forward", forward), ("Backward", pb.BackwardRequest(session_id=sid)), ("ForwardBackward", fb),
            ("SetParameters", set_params), ("GetParameters", pb.GetParametersRequest(session_id=sid)),
            ("GradientCheck", pb.GradientCheckRequest(session_id=sid, inputs=forward.inputs)),
            ("CloseSession", pb.CloseSessionRequest(session_id=sid))]


def test_calls_without_a_valid_token_are_unauthenticated_but_health_answers(token_server) -> None:
    for token, words in ((None, "missing credentials"), ("not-a-token", "unknown bearer token")):
        stub, channel = stub_for(token_server.address, token)
        with channel:
            for method, request in [("CreateSession", pb.CreateSessionRequest()), ("ListOps", pb.ListOpsRequest()),
                                    *every_call("0" * 32)]:
                code, details = code_of(getattr(stub, method), request)
                assert (code, words in details) == (Code.UNAUTHENTICATED, True), (method, code, details)
            assert health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
                health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(token_server.address) as channel:
        stub = pb_grpc.GradientServiceStub(channel)
        for header in (f"Basic {TOKENS['bob']}", "Bearer", "Bearer  "):
            with pytest.raises(grpc.RpcError) as e:
                stub.ListOps(pb.ListOpsRequest(), timeout=5, metadata=[("authorization", header)])
            assert e.value.code() == Code.UNAUTHENTICATED and "Bearer <token>" in e.value.details()


def test_a_session_is_not_found_for_every_other_principal(token_server) -> None:
    alice, a_channel = stub_for(token_server.address, TOKENS["alice"])
    alice2, a2_channel = stub_for(token_server.address, TOKENS["alice2"])
    bob, b_channel = stub_for(token_server.address, TOKENS["bob"])
    with a_channel, a2_channel, b_channel:
        W = np.random.default_rng(3).normal(size=(2, 3))
        sid = create(alice, params={"W": W, "b": np.zeros(3)})
        alice.Forward(forward_request(sid, batch()))
        unknown = "f" * 32
        for (method, request), (_, same_for_unknown) in zip(every_call(sid), every_call(unknown)):
            code, details = code_of(getattr(bob, method), request)
            assert code == Code.NOT_FOUND, (method, code, details)
            # exactly what an id that never existed gets, apart from the id itself
            assert details.replace(sid[:8], "?") == code_of(getattr(bob, method), same_for_unknown)[1].replace(
                unknown[:8], "?"), method
        # nor over a CallStream: the same answer as the unary call, ending the stream
        with pytest.raises(grpc.RpcError) as streamed:
            list(bob.CallStream(iter([pb.StreamCall(forward=forward_request(sid, batch()))]), timeout=10))
        assert streamed.value.code() == Code.NOT_FOUND
        assert streamed.value.details() == code_of(bob.Forward, forward_request(sid, batch()))[1]
        # bob changed nothing: same parameters, and the cached forward is still there
        got = codec.from_tensor(alice.GetParameters(pb.GetParametersRequest(session_id=sid)).params["W"])
        np.testing.assert_array_equal(got, W)
        assert len(alice.Backward(pb.BackwardRequest(session_id=sid)).param_grads) == 2
        # another token of the same user is the same principal
        assert alice2.GetParameters(pb.GetParametersRequest(session_id=sid)).params["W"].data == W.tobytes()
        alice2.CloseSession(pb.CloseSessionRequest(session_id=sid))
        assert code_of(alice.GetParameters, pb.GetParametersRequest(session_id=sid))[0] == Code.NOT_FOUND


def test_sdk_sends_its_token_with_every_call(token_server) -> None:
    g = gg.Graph("float64")
    x, y = g.input("x", (None, 2)), g.input("y", (None,), dtype="int64")
    g.set_loss(gg.softmax_cross_entropy(x @ g.param("W", (2, 3)), y))
    with gg.connect(token_server.address, token=TOKENS["bob"]) as client, client.session(g) as sess:
        loss, grads = sess.forward_backward(batch())
        assert np.isfinite(loss) and grads["W"].shape == (2, 3)
        assert len(client.list_ops()) > 10
    # the session's calls went over its CallStream, which carried the token too (gradgate.transport)
    assert Scrape.of(token_server.metrics_address).value("grpc_server_msg_received_total", grpc_method="CallStream",
                                                         grpc_service=GRADIENT_SERVICE) >= 1
    with gg.connect(token_server.address) as client, pytest.raises(gg.GradgateError) as e:
        client.list_ops()
    assert e.value.code == Code.UNAUTHENTICATED


def test_the_principal_is_the_calls_own(tmp_path) -> None:
    """Concurrent calls with different tokens never see each other's principal, in unary
    and streaming handlers, and nothing leaks into other threads."""
    (tmp_path / "tokens.csv").write_text("".join(f"t{i},user{i}\n" for i in range(8)))
    authenticate = Authenticator(load_tokens(tmp_path / "tokens.csv"))

    class Probe:  # stands in for GradientService behind the real envelope (rpc.py)
        def __getattr__(self, method: str):
            return lambda call: json.dumps([principal(), threading.get_ident()]).encode()

        def UploadData(self, calls, context) -> bytes:
            return json.dumps([principal() for _ in calls]).encode()

        def Train(self, calls, context):
            for _ in calls:
                yield principal().encode()

    handlers = gradient_service_handlers(Probe(), Metrics(), 2**20, 1000, authenticate,
                                         streams=Streams(16, 16, 60.0))  # a slot for every thread below
    server = grpc.server(futures.ThreadPoolExecutor(8))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            unary = channel.unary_unary(f"/{SERVICE.full_name}/ListOps")
            upload = channel.stream_unary(f"/{SERVICE.full_name}/UploadData")
            train = channel.stream_stream(f"/{SERVICE.full_name}/Train")
            calls = channel.stream_stream(f"/{SERVICE.full_name}/CallStream")
            forward = codec.encode_within(1, pb.ForwardRequest())

            def one(i: int) -> None:
                user, md = f"user{i % 8}", [("authorization", f"Bearer t{i % 8}")]
                assert json.loads(unary(b"", metadata=md, timeout=10))[0] == user
                assert json.loads(upload(iter([b""] * 3), metadata=md, timeout=10)) == [user] * 3
                assert list(train(iter([b""] * 3), metadata=md, timeout=10)) == [user.encode()] * 3
                assert [json.loads(a)[0] for a in calls(iter([forward] * 3), metadata=md, timeout=10)] == [user] * 3
            with futures.ThreadPoolExecutor(16) as pool:
                list(pool.map(one, range(300)))
            with pytest.raises(grpc.RpcError) as e:
                unary(b"", timeout=10)
            assert e.value.code() == Code.UNAUTHENTICATED
        assert principal() == ANONYMOUS.name  # the test's own thread never saw one
    finally:
        server.stop(0)


# -- TLS and mutual TLS ------------------------------------------------------------------

def test_tls_with_tokens(pki) -> None:
    config = Config(tls_cert=str(pki["server"]), tls_key=str(pki["server.key"]), auth_tokens=str(pki["tokens"]),
                    metrics_port=0)
    with serve("127.0.0.1:0", config) as srv:
        with gg.connect(srv.address, tls=gg.TLS(ca=pki["ca"]), token=TOKENS["alice"]) as client:
            assert len(client.list_ops()) > 10
            g = gg.Graph("float64")
            x = g.input("x", (None, 2))
            g.set_loss(gg.sum(x * g.param("w", (2,))))
            with client.session(g, {"w": np.array([3.0, -4.0])}) as sess:  # over its CallStream, with TLS
                loss, grads = sess.forward_backward({"x": np.array([[1.0, 2.0]])})
            assert loss == -5.0 and grads["w"].tolist() == [1.0, 2.0]
            assert Scrape.of(srv.metrics_address).value("grpc_server_msg_received_total", grpc_method="CallStream",
                                                        grpc_service=GRADIENT_SERVICE) >= 1
        with gg.connect(srv.address, tls=gg.TLS(ca=pki["ca"].read_bytes(), server_name="localhost"),
                        token=TOKENS["alice"]) as client:
            assert len(client.list_ops()) > 10
        for kwargs in ({"token": TOKENS["alice"]},  # plaintext to a TLS port
                       {"tls": gg.TLS(ca=pki["rogue"]), "token": TOKENS["alice"]}):  # server not trusted
            with gg.connect(srv.address, timeout=3, **kwargs) as client, pytest.raises(gg.GradgateError) as e:
                client.list_ops()
            assert e.value.code == Code.UNAVAILABLE
        with gg.connect(srv.address, tls=gg.TLS(ca=pki["ca"])) as client, pytest.raises(gg.GradgateError) as e:
            client.list_ops()
        assert e.value.code == Code.UNAUTHENTICATED


def test_mutual_tls_makes_the_certificate_subject_the_principal(pki) -> None:
    config = Config(tls_cert=str(pki["server"]), tls_key=str(pki["server.key"]), tls_client_ca=str(pki["ca"]))
    with serve("127.0.0.1:0", config) as srv:
        def tls(who: str) -> gg.TLS:
            return gg.TLS(ca=pki["ca"], cert=pki[who], key=pki[f"{who}.key"])
        g = gg.Graph("float64")
        g.set_loss(gg.sum(g.param("W", (2,))))
        with gg.connect(srv.address, tls=tls("alice"), recover_sessions=False) as alice, \
                gg.connect(srv.address, tls=tls("bob"), recover_sessions=False) as bob:
            sess = alice.session(g, {"W": np.array([1.0, 2.0])})
            assert [s.owner for s in srv.store._sessions.values()] == ["CN=alice,O=gradgate tests"]
            with pytest.raises(gg.GradgateError) as e:
                bob.call("GetParameters", pb.GetParametersRequest(session_id=sess.id))
            assert e.value.code == Code.NOT_FOUND
            np.testing.assert_array_equal(sess.get_params()["W"], [1.0, 2.0])
        for bad in (gg.TLS(ca=pki["ca"]), tls("mallory")):  # no client certificate; one from another CA
            with gg.connect(srv.address, tls=bad, timeout=3) as client, pytest.raises(gg.GradgateError) as e:
                client.list_ops()
            assert e.value.code == Code.UNAVAILABLE
        with pytest.raises(ValueError, match="both cert and key"):
            gg.connect(srv.address, tls=gg.TLS(ca=pki["ca"], cert=pki["alice"]))


def test_bad_security_flags_fail_at_startup(pki) -> None:
    for config, words in ((Config(tls_cert=str(pki["server"])), "go together"),
                          (Config(tls_client_ca=str(pki["ca"])), "needs --tls-cert"),
                          (Config(auth_tokens=str(pki["ca"])), "expected token,user")):
        with pytest.raises(ValueError, match=words):
            serve("127.0.0.1:0", config)


def test_startup_log_says_how_the_server_is_secured(pki) -> None:
    for args, security, loopback_note in (
            ((), "transport plaintext, authentication none (every client is trusted)", True),
            (("--tls-cert", str(pki["server"]), "--tls-key", str(pki["server.key"]), "--auth-tokens",
              str(pki["tokens"])), "transport TLS, authentication bearer tokens", False)):
        server = ServerProcess(*args)
        try:
            listening = next(line for line in server.log if line.get("event") == "listening")
            assert listening["security"] == security
            assert listening["address"].startswith("127.0.0.1:")  # loopback unless --host says otherwise
            if loopback_note:
                note = server.next_line(lambda line: "loopback only" in line.get("message", ""), timeout=10)
                assert "no authentication" in note["message"]
        finally:
            server.close()


def test_readme_security_example_runs(pki, monkeypatch) -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("## Security"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    config = Config(tls_cert=str(pki["server"]), tls_key=str(pki["server.key"]), auth_tokens=str(pki["tokens"]),
                    metrics_port=0)
    monkeypatch.chdir(pki["ca"].parent)  # ca.pem is there
    with serve("127.0.0.1:0", config) as srv:
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(code, {"address": srv.address, "token": TOKENS["bob"]})
    assert printed.getvalue().endswith(" ops\n") and int(printed.getvalue().split()[0]) > 10
