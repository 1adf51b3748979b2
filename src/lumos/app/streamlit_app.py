"""The lumos web app. Start it with ``lumos app [--model M] [--port P]`` (or ``streamlit run`` this file).

Everything heavy lives in ``lumos.app.logic``; this script wires it to widgets and caches: the model once
per process (``st.cache_resource``), forwards and maps per (image bytes hash, model, settings)
(``st.cache_data``). User mistakes show as short messages, never tracebacks.
"""

from __future__ import annotations

import inspect
import json
import os
import sys

import streamlit as st
import torch

from lumos.app import logic

# Half the cores, at most 4 (LUMOS_APP_THREADS overrides): on a small shared machine extra intra-op threads
# spin-wait against other processes, and one thread was ~20x faster than two on a loaded 2-core box.
torch.set_num_threads(logic.thread_count(os.environ.get("LUMOS_APP_THREADS"), os.cpu_count()))

st.set_page_config(page_title="lumos: where does the model look?", layout="wide")

CONFIG = logic.parse_app_args(sys.argv[1:])
MODEL_KEY = json.dumps(CONFIG.__dict__, sort_keys=True, default=list)


# ------------------------------------------------------------------------------------------- caching


@st.cache_resource(show_spinner=False)
def get_bundle(model_key: str):
    cfg = json.loads(model_key)
    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}
    bundle = logic.load_bundle(logic.AppConfig(**cfg))
    logic.warm_up(bundle)
    return bundle


@st.cache_resource(show_spinner=False)
def get_layers(model_key: str):
    return logic.map_layers(get_bundle(model_key))


@st.cache_resource(show_spinner=False)
def get_class_names(model_key: str) -> list[str]:
    return logic.class_names(get_bundle(model_key))


@st.cache_data(show_spinner=False, max_entries=64)
def decode(image_hash: str, name: str, _data: bytes):
    return logic.decode_image(_data, name)


@st.cache_data(show_spinner=False, max_entries=256)
def predict(model_key: str, image_hash: str, _image):
    return logic.top_classes(get_bundle(model_key), _image, k=5)


@st.cache_data(show_spinner=False, max_entries=256)
def explain(model_key: str, image_hash: str, method: str, target: int | None, layer: str, settings: str, _image):
    return logic.run_method(get_bundle(model_key), _image, method, target, layer, json.loads(settings))


@st.cache_data(show_spinner=False, max_entries=32)
def features(model_key: str, image_hash: str, layer: str, n: int, _image):
    return logic.feature_grid_image(get_bundle(model_key), _image, layer, n)


@st.cache_data(show_spinner=False, max_entries=64)
def evaluate(model_key: str, image_hash: str, keys: str, target: int | None, steps: int, _image, _maps):
    return logic.deletion_insertion(get_bundle(model_key), _image, _maps, target, steps)


# ------------------------------------------------------------------------------------------------ page

st.title("lumos: where does the model look?")

try:
    with st.spinner(f"Loading model {CONFIG.model} ..."):
        bundle = get_bundle(MODEL_KEY)
except Exception as err:  # a model that fails to load: one message, nothing else to do
    st.error(f"Could not load the model {CONFIG.model}: {logic.describe_error(err)}")
    st.stop()

methods = logic.available_methods()

# ---- sidebar: explanation settings
with st.sidebar:
    st.header("Explanation")
    st.caption(f"Model: **{bundle.name or CONFIG.model}**")
    chosen = st.multiselect("Methods", methods, default=["gradcam"] if "gradcam" in methods else methods[:1],
                            format_func=logic.display_name, key="methods")
    try:
        layer_names, auto_layer = get_layers(MODEL_KEY)
    except Exception as err:
        st.warning(f"Could not list the layers: {logic.describe_error(err)}")
        layer_names, auto_layer = [], "?"
    layer_options = ["auto", *layer_names]
    layer = st.selectbox("Layer (CAM methods)", layer_options, key="layer",
                         format_func=lambda n: f"auto ({auto_layer})" if n == "auto" else n)
    settings: dict[str, dict] = {}
    for m in chosen:
        for s in logic.method_settings(m):
            key = f"set_{m}_{s.param}"
            if s.kind == "int":
                value = st.slider(s.label, int(s.low), int(s.high), int(s.default), int(s.step), key=key)
            elif s.kind == "float":
                value = st.slider(s.label, float(s.low), float(s.high), float(s.default), float(s.step), key=key)
            else:
                value = st.selectbox(s.label, list(s.options), index=list(s.options).index(s.default), key=key)
            settings.setdefault(m, {})[s.param] = value
    st.header("Display")
    colormap = st.selectbox("Colormap", ["jet", "turbo", "viridis", "inferno", "magma", "plasma", "hot"],
                            key="colormap")
    alpha = st.slider("Opacity", 0.0, 1.0, 0.5, 0.05, key="alpha")

# ---- input
if "uploader_key" not in st.session_state:
    st.session_state.uploader_key = 0
# The uploader states the size limit itself ("Limit 20MB per file"): give it the app's limit (`lumos app` also
# sets server.maxUploadSize to it), so the page states one limit. Older Streamlit has no max_upload_size.
_limit = ({"max_upload_size": logic.MAX_UPLOAD_MB}
          if "max_upload_size" in inspect.signature(st.file_uploader).parameters else {})
uploads = st.file_uploader(
    f"Upload images (at most {logic.MAX_PIXELS // 1_000_000} megapixels each)",
    type=logic.UPLOAD_TYPES, accept_multiple_files=True, key=f"uploader_{st.session_state.uploader_key}", **_limit,
)
st.caption("... or try an example photo:")
cols = st.columns(len(logic.EXAMPLES))
for col, name in zip(cols, logic.EXAMPLES, strict=True):
    if col.button(name, key=f"example_{name}"):
        st.session_state.example = name
        st.session_state.uploader_key += 1  # clears the uploader
        st.rerun()

sources: list[tuple[str, bytes]] = []
if uploads:
    sources = [(u.name, u.getvalue()) for u in uploads]
    st.session_state.pop("example", None)
elif st.session_state.get("test_upload"):  # test hook: (name, bytes), as an upload would give
    sources = [tuple(st.session_state.test_upload)]
elif st.session_state.get("example"):
    try:
        sources = [(st.session_state.example + ".png", logic.example_image(st.session_state.example))]
    except Exception as err:
        st.error(f"Could not load the example photo: {logic.describe_error(err)}")

images = []
for name, data in sources:
    try:
        images.append((name, logic.digest(data), decode(logic.digest(data), name, data)))
    except Exception as err:
        st.error(logic.describe_error(err))
if not images:
    if not sources:
        st.info("Upload an image or pick an example to see what the model predicts, and why.")
    st.stop()

if len(images) > 1:
    pick = st.radio("Image", range(len(images)), format_func=lambda i: images[i][0], horizontal=True, key="pick")
else:
    pick = 0
image_name, image_hash, image = images[pick]

# ---- prediction and class choice
try:
    with st.spinner("Predicting ..."):
        top = predict(MODEL_KEY, image_hash, image)
except Exception as err:
    st.error(f"Could not run the model on {image_name}: {logic.describe_error(err)}")
    st.stop()

left, right = st.columns([1, 1])
with left:
    st.subheader("Top-5 predictions")
    st.markdown(logic.top5_html(top), unsafe_allow_html=True)
with right:
    st.subheader("Class to explain")

    top5_key = f"top5_{image_hash}_{MODEL_KEY}"

    def _clear_search() -> None:
        st.session_state.search = None

    def _clear_top5() -> None:
        if st.session_state.get("search"):
            st.session_state[top5_key] = None

    top_choice = st.radio("Top-5", range(len(top)), horizontal=True, key=top5_key,
                          format_func=lambda j: f"{top[j][1]} ({top[j][2]:.2f})", on_change=_clear_search)
    names = get_class_names(MODEL_KEY)
    searched = st.selectbox("... or search any class", names, index=None, key="search",
                            placeholder="type a class name", on_change=_clear_top5) if names else None
    target = int(searched.split(":", 1)[0]) if searched else top[0 if top_choice is None else top_choice][0]
    label_of = (lambda i: bundle.labels[i]) if bundle.labels is not None else (lambda i: f"class {i}")  # noqa: E731
    st.caption(f"Explaining class **{target}: {label_of(target)}**")

# ---- results side by side with the original
st.subheader("Explanations")
if not chosen:
    st.info("Choose at least one method in the sidebar.")
results: dict[str, logic.MethodResult] = {}
rendered = {}
cells = st.columns(len(chosen) + 1)
cells[0].image(image, caption=f"original: {image_name}", width="stretch")
for cell, m in zip(cells[1:], chosen, strict=True):
    with cell:
        try:
            with st.spinner(f"{logic.display_name(m)} ..."):
                res = explain(MODEL_KEY, image_hash, m, target, layer,
                              json.dumps(settings.get(m, {}), sort_keys=True), image)
            pic = logic.render_result(image, res, colormap, alpha)
        except Exception as err:
            st.error(f"{logic.display_name(m)}: {logic.describe_error(err)}")
            continue
        results[m], rendered[m] = res, pic
        where = f" @ {res.layer}" if res.layer else ""
        st.image(pic, caption=f"{logic.display_name(m)}{where}", width="stretch")
        stem = f"{image_name.rsplit('.', 1)[0]}_{logic.file_stem(m)}"
        st.download_button("PNG", logic.png_bytes(pic), f"{stem}.png", "image/png", key=f"png_{m}")
        st.download_button("raw .npy", logic.npy_bytes(res.raw), f"{stem}_raw.npy", "application/octet-stream",
                           key=f"npy_{m}")
if results:
    st.download_button(
        "Download everything (ZIP)",
        logic.build_zip(image_name, image, results, rendered, top),
        f"{image_name.rsplit('.', 1)[0]}_lumos.zip", "application/zip", key="zip",
    )

# ---- feature maps
with st.expander("Feature-map browser"):
    fcol1, fcol2 = st.columns([2, 1])
    f_layer = fcol1.selectbox("Layer", layer_options, key="feature_layer",
                              format_func=lambda n: f"auto ({auto_layer})" if n == "auto" else n)
    f_n = fcol2.slider("Channels", 4, 64, 16, 4, key="feature_n")
    if st.toggle("Show the most active channels", key="feature_show"):
        try:
            with st.spinner("Recording feature maps ..."):
                grid, f_name, channels = features(MODEL_KEY, image_hash, f_layer, f_n, image)
            st.image(grid, caption=f"{f_name}: top {len(channels)} channels by mean activation")
        except Exception as err:
            st.error(logic.describe_error(err))

# ---- evaluation
if logic.evaluation_available():
    with st.expander("Evaluation: deletion / insertion"):
        st.caption("Deletion removes the most important pixels first (a faithful map makes the probability fall: "
                   "lower AUC is better); insertion restores them into a blurred image (higher AUC is better).")
        steps = st.slider("Steps", 5, 50, 20, 5, key="eval_steps")
        if results and st.toggle("Compute curves for the shown methods", key="eval_show"):
            maps = {m: r.map for m, r in results.items()}
            try:
                with st.spinner("Scoring perturbed images ..."):
                    curves = evaluate(MODEL_KEY, image_hash, json.dumps(sorted(maps)) + layer +
                                      json.dumps(settings, sort_keys=True), target, steps, image, maps)
                st.pyplot(logic.curves_figure(curves))
                st.dataframe({"method": [logic.display_name(m) for m in curves],
                              "deletion AUC": [c.deletion_auc for c in curves.values()],
                              "insertion AUC": [c.insertion_auc for c in curves.values()]}, hide_index=True)
            except Exception as err:
                st.error(logic.describe_error(err))
