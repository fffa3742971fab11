"""A session survives its server: restarted on the same address (what a sticky proxy
does when a replica goes away), the SDK re-creates the session from the parameters it
last sent and replays the last forward, and results stay exactly the same."""
from __future__ import annotations

import time

import numpy as np
import pytest

import gradgate as gg
from gradgate.cli import two_layer_net
from gradgate_server import Config, serve


def restart(server):
    """Stop ``server`` and start an empty one on the same address."""
    address = server.address
    server.stop(0)
    return serve(address)


def data() -> dict[str, np.ndarray]:
    X, y = gg.spiral(n_per_class=20, seed=1)
    return {"x": X, "y": y}


def test_backward_after_a_restart_replays_the_forward() -> None:
    g = two_layer_net(hidden=8)
    server = serve("127.0.0.1:0")
    try:
        with gg.connect(server.address, timeout=10) as client:
            sess = client.session(g, gg.init_params(g, seed=3))
            new_params = gg.init_params(g, seed=4)
            loss = sess.forward(data(), params=new_params).loss
            expected = sess.backward()
            first_id = sess.id
            server = restart(server)
            grads = sess.backward()  # the new server has never seen this session
            assert sess.id != first_id
            assert grads.keys() == expected.keys()
            for name in expected:
                np.testing.assert_array_equal(grads[name], expected[name])
            assert sess.forward(data()).loss == loss  # the parameters set by forward(params=) came along
            for name, value in sess.get_params().items():
                np.testing.assert_array_equal(value, new_params[name].astype(np.float32))
    finally:
        server.stop(0)


def test_training_across_a_restart_matches_training_without_one() -> None:
    g = two_layer_net(hidden=16)

    def run(restart_between: bool) -> list[float]:
        server = serve("127.0.0.1:0")
        try:
            with gg.connect(server.address, timeout=10) as client, \
                    client.session(g, gg.init_params(g, seed=0)) as sess:
                opt = gg.optim.SGD(lr=0.5, momentum=0.9)
                losses = gg.train(sess, data(), opt, epochs=5, batch_size=30, seed=0, progress=False)
                if restart_between:
                    server = restart(server)
                losses += gg.train(sess, data(), opt, epochs=5, batch_size=30, seed=1, progress=False)
                return losses
        finally:
            server.stop(0)

    plain, restarted = run(False), run(True)
    assert len(plain) == 20
    assert restarted == plain


def test_an_expired_session_comes_back_with_its_parameters() -> None:
    g = two_layer_net(hidden=4)
    params = gg.init_params(g, seed=7)
    with serve("127.0.0.1:0", Config(session_ttl_seconds=0.05)) as server, \
            gg.connect(server.address, timeout=10) as client, client.session(g, params) as sess:
        sess.forward(data())
        deadline = time.monotonic() + 10
        while len(server.store) and time.monotonic() < deadline:  # the server's sweeper expires it
            time.sleep(0.05)
        assert len(server.store) == 0
        got = sess.get_params()
        assert sorted(got) == sorted(params)
        for name in params:
            np.testing.assert_array_equal(got[name], params[name])


def test_a_session_closed_by_its_owner_is_not_recreated() -> None:
    g = two_layer_net(hidden=4)
    with serve("127.0.0.1:0") as server, gg.connect(server.address, timeout=10) as client:
        sess = client.session(g)
        sess.close()
        with pytest.raises(gg.GradgateError) as e:
            sess.forward(data())
        assert e.value.code.name == "NOT_FOUND"
        assert len(server.store) == 0
