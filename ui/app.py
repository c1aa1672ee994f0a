"""Streamlit upload page for the cifar3 model served by TorchServe.

Start TorchServe first (``.venv/bin/python scripts/serve.py start``), then, from the repository root:

    .venv/bin/streamlit run ui/app.py --server.address 127.0.0.1 --server.port 8501 --server.headless true

and open http://127.0.0.1:8501. Upload one or several images (jpg, jpeg, png, webp, bmp, gif): each is
sent to the server as raw bytes, all of them concurrently, and shown with its predicted class, the
probability of every class and the round-trip latency. The sidebar shows the server's state. The toggle
"Show what the model looked at" asks the explanations API instead and lays each image's heat map over it
(red: strongest evidence for the class; the class to explain and the method are selectable).

The page only speaks HTTP to TorchServe (see cifar3_client/client.py; no torch here). Configuration comes
from CIFAR3_INFERENCE_URL, CIFAR3_MANAGEMENT_URL, CIFAR3_TOKEN_FILE, CIFAR3_TOKEN and
CIFAR3_TIMEOUT, and from nothing a visitor types. With CIFAR3_UI_ALLOW_OVERRIDES=1 (for a page only its
owner can reach) the sidebar's "Connection settings" let a visitor point the page at another server for
their browser session; the configured keys are never sent there (see cifar3_client/client.py).
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence

import altair as alt
import pandas as pd
import streamlit as st
from PIL import Image, UnidentifiedImageError

from cifar3_client.client import (
    IMAGE_TYPES,
    Cifar3Client,
    ClientError,
    Config,
    Outcome,
    Prediction,
    ServerState,
    overlay_heatmap,
)

PREVIEW_WIDTH = 160
PREDICTED = "the predicted class"  # the explain selector's default: each image's own prediction
OK, BAD = ":green[:material/check_circle:]", ":red[:material/cancel:]"  # icons bundled with Streamlit


@st.cache_resource(show_spinner=False)
def env_config(env: tuple[tuple[str, str], ...]) -> Config:
    """The configuration the CIFAR3_* variables describe (cached per set of values)."""
    return Config.from_env(dict(env))


@st.cache_resource(show_spinner=False)
def get_client(config: Config) -> Cifar3Client:
    """One client, with its pooled requests.Session, per configuration."""
    return Cifar3Client(config)


def cifar3_env() -> tuple[tuple[str, str], ...]:
    """This process's CIFAR3_* variables, as a hashable cache key."""
    return tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("CIFAR3_")))


def sidebar_config(defaults: Config) -> Config:
    """The configuration after the sidebar's overrides (empty fields keep the defaults); the configuration as
    it is unless CIFAR3_UI_ALLOW_OVERRIDES is set."""
    if not defaults.allow_overrides:
        return defaults
    with st.sidebar.expander("Connection settings"):
        inference = st.text_input("Inference API", value=defaults.inference_url, key="inference_url")
        management = st.text_input("Management API", value=defaults.management_url, key="management_url")
        token = st.text_input(
            "Inference token",
            value="",
            type="password",
            key="token",
            placeholder="the configured server's key is used there",
            help="The inference key of the server typed above. The configured keys are sent only to the "
            "configured servers, never to a typed address.",
        )
        timeout = st.number_input(
            "Prediction timeout (s)",
            min_value=1.0,
            max_value=600.0,
            step=5.0,
            value=float(min(max(defaults.timeout, 1.0), 600.0)),
            key="timeout",
        )
    return defaults.with_overrides(
        inference_url=inference or defaults.inference_url,
        management_url=management or defaults.management_url,
        typed_token=token,
        timeout=timeout,
    )


def mark(ok: bool) -> str:
    return OK if ok else BAD


def show_server_state(box, state: ServerState, config: Config) -> None:
    """The sidebar's server panel: reachability, model readiness, workers, batch size, metadata, problems."""
    box.header("Server")
    box.markdown(
        f"{mark(state.reachable)} Inference API {'reachable' if state.reachable else 'not reachable'}  \n"
        f"`{config.inference_url}`"
    )
    model = state.model
    if model is None:
        box.markdown(f"{BAD} Model `{config.model}`: unknown")
    else:
        box.markdown(
            f"{mark(model.ready)} Model `{config.model}` {'READY' if model.ready else 'not ready'}  \n"
            f"Workers: {model.ready_workers} READY of {len(model.workers)} · "
            f"batch size: {model.batch_size if model.batch_size is not None else '?'}"
        )
        meta = model.metadata
        if meta:
            lines = [f"Classes: {', '.join(map(str, meta.get('classes', [])))}"]
            if isinstance(meta.get("val_accuracy"), (int, float)):
                lines.append(f"Validation accuracy: {meta['val_accuracy']:.1%}")
            lines += [
                f"{label}: {meta[key]}"
                for key, label in (
                    ("variant", "Model"),
                    ("image_size", "Input size"),
                    ("trained", "Trained"),
                    ("device", "Device"),
                )
                if meta.get(key) not in (None, "")
            ]
            box.subheader("Model")
            box.markdown("  \n".join(lines))
    for problem in state.problems:
        box.error(problem)
    box.button("Check again", key="refresh", help="Query the server's state again")


def preview(data: bytes, name: str) -> None:
    """The uploaded image, or a note when it cannot be decoded here (the server then says why)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
        st.image(data, caption=name, width=PREVIEW_WIDTH)
    except (Image.DecompressionBombError, UnidentifiedImageError, OSError, ValueError, SyntaxError):
        st.caption(f"{name}: no preview (not an image this page can decode)")


def probability_chart(prediction: Prediction) -> alt.LayerChart:
    """Horizontal bars of every class's probability in percent, most probable on top, labelled."""
    data = pd.DataFrame(prediction.chart_data())  # already most probable first
    data["predicted"] = data["class"] == prediction.pred_class
    data["label"] = [f"{p:.1f}%" for p in data["probability (%)"]]
    base = alt.Chart(data).encode(
        y=alt.Y("class:N", sort=list(data["class"]), title=None, axis=alt.Axis(labelFontSize=13, labelOverlap=False)),
        x=alt.X(
            "probability (%):Q",
            scale=alt.Scale(domain=[0, 112]),
            axis=alt.Axis(values=[0, 25, 50, 75, 100], title="probability (%)"),
        ),
        tooltip=["class", alt.Tooltip("probability (%):Q", format=".2f")],
    )
    bars = base.mark_bar(cornerRadiusEnd=3).encode(
        color=alt.condition("datum.predicted", alt.value("#1f77b4"), alt.value("#a6c8e8"))
    )
    labels = base.mark_text(align="left", dx=4, fontSize=12).encode(text="label:N")
    return (bars + labels).properties(height=alt.Step(30))


def show_outcome(outcome: Outcome, data: bytes, alpha: float = 0.5) -> None:
    """One image's card: the image (with its heat map when explained), then its predicted class, latency and
    probability chart, or the error."""
    explanation = outcome.explanation
    with st.container(border=True):
        columns = st.columns([1, 1, 3] if explanation else [1, 3])
        with columns[0]:
            preview(data, outcome.name)
        if explanation:
            unknown = outcome.prediction is not None and outcome.prediction.unknown
            columns[1].image(
                overlay_heatmap(data, explanation.heatmap, alpha=alpha, size=PREVIEW_WIDTH),
                # an unknown image is explained for the class it resembles most; the caption keeps that visible
                caption=f"{explanation.method} for {explanation.target}" + (" (looks like none)" if unknown else ""),
                width=PREVIEW_WIDTH,
            )
        with columns[-1]:
            if outcome.prediction is None:
                st.error(outcome.error)
                st.caption(f"{outcome.name} · round trip {outcome.latency_ms:.0f} ms")
                return
            prediction = outcome.prediction
            confidence = prediction.probs.get(prediction.pred_class, 0.0)
            if prediction.unknown:
                # The model's classes still get their probabilities: they say which one it resembles most.
                st.markdown(f"#### {outcome.name}: looks like none of: {', '.join(prediction.probs)}")
                st.caption(
                    f"unknown score {prediction.unknown_score:.3g}, above the server's threshold · closest class "
                    f"{prediction.pred_class} ({confidence:.1%} among the classes) · round trip "
                    f"{outcome.latency_ms:.0f} ms"
                )
            else:
                st.markdown(f"#### {outcome.name}: **{prediction.pred_class}**")
                st.caption(f"{confidence:.1%} confident · round trip {outcome.latency_ms:.0f} ms")
            st.altair_chart(probability_chart(prediction), width="stretch")


def explain_options(
    classes: Sequence[str], explanation: dict | None = None
) -> tuple[bool, str | None, str | None, float]:
    """The "Show what the model looked at" toggle and, when on, the class to explain, the method (from the
    server's describe ``explanation``: its methods and default; none offered when it does not say) and the
    overlay's opacity."""
    explain = st.toggle(
        "Show what the model looked at",
        key="explain",
        help="TorchServe's explanations API: red marks where the evidence for the class lies.",
    )
    if not explain:
        return False, None, None, 0.5
    left, middle, right = st.columns(3)
    target = left.selectbox("Class to explain", [PREDICTED, *classes], key="explain_target")
    methods = [str(m) for m in (explanation or {}).get("methods") or []]
    default = (explanation or {}).get("default")
    method = (
        middle.selectbox("Method", methods, index=methods.index(default) if default in methods else 0,
                         key="explain_method")
        if methods
        else None
    )  # fmt: skip
    alpha = right.slider("Heat map opacity", 0.1, 0.9, 0.5, 0.1, key="explain_alpha")
    return True, None if target == PREDICTED else target, method, alpha


def show_results(
    client: Cifar3Client,
    files: Sequence,
    explain: bool = False,
    target: str | None = None,
    alpha: float = 0.5,
    method: str | None = None,
) -> None:
    """Send every upload at once and show the answers in upload order."""
    uploads = [(f.name, f.getvalue()) for f in files]
    with st.spinner(f"{'Explaining' if explain else 'Classifying'} {len(uploads)} image(s)…"):
        outcomes = client.predict_many(uploads, explain=explain, target=target, method=method)
    ok = sum(o.prediction is not None for o in outcomes)
    st.caption(
        f"{ok} of {len(outcomes)} image(s) classified · slowest round trip "
        f"{max(o.latency_ms for o in outcomes):.0f} ms (sent concurrently)"
    )
    for outcome, (_, data) in zip(outcomes, uploads, strict=True):
        show_outcome(outcome, data, alpha)


def main() -> None:
    st.set_page_config(page_title="cifar3 classifier", page_icon=":material/image_search:", layout="wide")
    status_box = st.sidebar.container()
    try:
        config = sidebar_config(env_config(cifar3_env()))
    except ClientError as exc:
        st.error(f"Configuration error: {exc.message}")
        st.stop()
    client = get_client(config)
    state = client.server_state()
    show_server_state(status_box, state, config)

    classes = state.model.metadata.get("classes") if state.model else None
    # The served model names its classes; until the server says, the page does not guess them.
    told = ", ".join(map(str, classes)) if isinstance(classes, list) and classes else "the classes of its checkpoint"
    st.title("cifar3 image classifier")
    st.caption(f"A ResNet18 served by TorchServe at {config.inference_url} tells {told} apart.")
    if state.blocking:
        st.error(f"The server cannot classify images right now: {state.blocking}")
    elif state.problems:
        st.warning(f"Images can be sent, but the server's state is incomplete: {state.problems[0]}")
    explanation = state.model.metadata.get("explanation") if state.model else None
    explain, target, method, alpha = explain_options(
        [str(c) for c in classes] if isinstance(classes, list) else [],
        explanation if isinstance(explanation, dict) else None,
    )
    files = st.file_uploader(
        "Images",
        type=list(IMAGE_TYPES),
        accept_multiple_files=True,
        key="images",
        help="One or several images; each is sent to the server as it is.",
    )
    if not files:
        st.info(f"Upload one or several images ({', '.join(IMAGE_TYPES)}) to classify them.")
        return
    show_results(client, files, explain, target, alpha, method)


main()
