"""DeVec Studio (placeholder until the app issue lands): shows the decomposition of a toy pool."""

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402

with gr.Blocks(title="DeVec Studio") as demo:
    gr.Markdown("# DeVec Studio\nShared and unique parts of task vectors. The full app is under construction.")

if __name__ == "__main__":
    demo.launch()
