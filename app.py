"""CIDM Studio: the Gradio app. Thin by design: each tab is one builder; all method logic lives in `cidm/`."""

from __future__ import annotations

import os

import gradio as gr
import spaces

from cidm import models

_BASE = {}  # the base pipeline, loaded once on first use (keeps start-up fast)


def base():
    if "pipe" not in _BASE:
        _BASE["pipe"], _BASE["info"] = models.load_base()
    return _BASE["pipe"], _BASE["info"]


@spaces.GPU(duration=60)
def generate(prompt: str, seed: int, steps: int, guidance: float):
    import torch

    if not prompt.strip():
        raise gr.Error("The prompt is empty: describe the image, e.g. 'a photo of a red star on a beach'.")
    try:
        pipe, info = base()
    except models.BaseModelError as err:
        raise gr.Error(str(err)) from err
    g = torch.Generator(pipe.device).manual_seed(int(seed))
    return pipe(prompt, num_inference_steps=int(steps), guidance_scale=float(guidance), generator=g).images[0]


def build_generate_tab():
    with gr.Row():
        with gr.Column():
            prompt = gr.Textbox(label="Prompt", value="a photo of a red star on a beach")
            seed = gr.Number(label="Seed", value=0, precision=0)
            steps = gr.Slider(1, 100, value=25, step=1, label="Steps")
            guidance = gr.Slider(1.0, 15.0, value=5.0, step=0.5, label="Guidance")
            button = gr.Button("Generate", variant="primary")
        image = gr.Image(label="Image", type="pil")
    gr.on([prompt.submit, button.click], generate, inputs=[prompt, seed, steps, guidance], outputs=image,
          api_name="generate", concurrency_id="gpu")


def build_app() -> gr.Blocks:
    with gr.Blocks(title="CIDM Studio") as demo:
        gr.Markdown("# CIDM Studio\nLearn your own concepts one after another without forgetting the earlier ones, "
                    f"and compose them where you draw boxes. Base model: `{models.default_model()}`.")
        with gr.Tabs():
            with gr.Tab("Generate"):
                build_generate_tab()
    demo.queue(max_size=16, default_concurrency_limit=1)
    return demo


if __name__ == "__main__":
    build_app().launch(server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                       server_port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
