"""The Space's named endpoints driven through gradio_client, as scripts would; sessions are isolated."""

import socket

import pytest
from PIL import Image

from cidm.toyworld import concepts as C


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def url(tiny_model_dir, tmp_path_factory):
    import os

    import app as app_module

    old = {k: os.environ.get(k) for k in ("CIDM_BASE_MODEL", "CIDM_LIBRARY")}
    os.environ["CIDM_BASE_MODEL"] = str(tiny_model_dir)
    os.environ.pop("CIDM_LIBRARY", None)  # one library per browser session
    app_module._BASE.clear()
    app_module._ACTIVE.clear()
    app_module.SESSIONS = tmp_path_factory.mktemp("sessions")
    demo = app_module.build_app()
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    demo.close()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def rows_of(table) -> list:
    """A Dataframe's rows from what gradio_client returns (a value, or an update holding one)."""
    value = table.get("value", table) if isinstance(table, dict) else table
    return value["data"] if isinstance(value, dict) else value


def photos(tmp_path, name, n=3):
    from conftest import write_photos

    return write_photos(tmp_path, name, n)


def test_named_endpoints_exist(url):
    from gradio_client import Client

    api = Client(url, verbose=False).view_api(return_format="dict", print_info=False)["named_endpoints"]
    for name in ("/learn", "/generate", "/compose", "/forgetting", "/library", "/delete", "/push", "/edit"):
        assert name in api, name


def test_learn_compose_and_forgetting_through_the_api_with_isolated_sessions(url, tmp_path):
    from gradio_client import Client, handle_file

    alice, bob = Client(url, verbose=False), Client(url, verbose=False)
    files = [handle_file(p) for p in photos(tmp_path, "medic")]
    status, plot, samples = alice.predict(files, "medic", "square", "object", 10, 0, False, api_name="/learn")
    assert "Learned `<medic>`" in status
    files = [handle_file(p) for p in photos(tmp_path, "bolt")]
    status, _, _ = alice.predict(files, "bolt", "triangle", "object", 10, 0, False, api_name="/learn")
    assert "Learned `<bolt>`" in status

    canvas = tmp_path / "canvas.png"
    Image.new("RGB", (64, 64), (235, 235, 235)).save(canvas)
    boxes = {"image": handle_file(str(canvas)), "boxes": [{"xmin": 0, "ymin": 0, "xmax": 32, "ymax": 64, "label": "medic"},
                                      {"xmin": 32, "ymin": 0, "xmax": 64, "ymax": 64, "label": "bolt"}]}
    image, layout = alice.predict(boxes, "a photo on a beach", "", 2, 5.0, 0, api_name="/compose")
    assert Image.open(image).size == (64, 64)

    table, grid, _, _ = alice.predict(api_name="/forgetting")
    assert [row[0] for row in rows_of(table)] == ["<medic>", "<bolt>"]
    assert Image.open(grid).size == (110 + 2 * 96, 22 + 2 * 96)

    rows, _, _ = bob.predict(api_name="/library")  # Bob sees none of Alice's concepts
    assert not [r for r in rows_of(rows) if any(r)]
    with pytest.raises(Exception, match="unknown concept <medic>"):
        bob.predict("a photo of a <medic>", "", 1, 2, 5.0, 0, api_name="/generate")


def test_push_and_pull_through_the_api_against_a_fake_hub(url, tmp_path, monkeypatch):
    import huggingface_hub.constants
    from gradio_client import Client, handle_file

    from fake_hub import FakeHub

    fake = FakeHub()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", fake.url)  # the app passes HF_ENDPOINT on, as the Hub client reads it
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")  # off a Space the push uses HF_TOKEN (no login button)
    carol = Client(url, verbose=False)
    files = [handle_file(p) for p in photos(tmp_path, "medic")]
    carol.predict(files, "medic", "square", "object", 10, 0, False, api_name="/learn")
    status = carol.predict("me/carol-concepts", True, api_name="/push")
    assert "Pushed to" in status and fake.tokens == {"hf_from_env"}
    pushed = fake.repos["me/carol-concepts"]
    assert "medic/pytorch_lora_weights.safetensors" in pushed and "cidm" in pushed["medic/README.md"].decode()

    dave = Client(url, verbose=False)  # another visitor, with an empty library
    table, _, _, status = dave.predict("me/carol-concepts", api_name="/pull")
    assert [row[0] for row in rows_of(table)] == ["medic"] and "Loaded 1 concepts" in status
    gallery = dave.predict("a photo of a <medic>", "", 1, 2, 5.0, 0, api_name="/generate")
    assert len(gallery) == 1
    with pytest.raises(Exception, match="already has concepts"):  # nothing the user has is overwritten
        dave.predict("me/carol-concepts", api_name="/pull")
