"""The lumos web app. Start it with ``lumos app [--model M] [--host H] [--port P] [--device D]`` (or
``streamlit run`` this file).

Everything heavy lives in ``lumos.app.logic``; this script wires it to widgets and caches. Method results are kept
per (model, image, class, method settings, and the layer only for methods that use one) in ``logic.RESULTS``, so
a change recomputes only what it affects, with a progress bar naming the method. User mistakes show as short
messages, never tracebacks.
"""

from __future__ import annotations

import inspect
import json
import os
import sys

import streamlit as st
import torch

from lumos.app import logic, task_logic

# Half the cores, at most 4 (LUMOS_APP_THREADS overrides): on a small shared machine extra intra-op threads
# spin-wait against other processes, and one thread was ~20x faster than two on a loaded 2-core box.
torch.set_num_threads(logic.thread_count(os.environ.get("LUMOS_APP_THREADS"), os.cpu_count()))

st.set_page_config(page_title="lumos: where does the model look?", layout="wide")

CONFIG = logic.parse_app_args(sys.argv[1:])
TASK = task_logic.parse_task(sys.argv[1:])  # --task detection|segmentation: the shipped synthetic models' views


# ------------------------------------------------------------------------------------------- caching


@st.cache_resource(show_spinner=False)
def get_bundle(model_key: str):
    bundle = logic.load_bundle(logic.AppConfig.from_key(model_key))
    logic.warm_up(bundle)
    return bundle


@st.cache_resource(show_spinner=False)
def get_layers(model_key: str):
    return logic.map_layers(get_bundle(model_key))


@st.cache_resource(show_spinner=False)
def get_attention(model_key: str) -> bool:
    return logic.has_attention(get_bundle(model_key))


@st.cache_resource(show_spinner=False)
def get_class_names(model_key: str) -> list[str]:
    return logic.class_names(get_bundle(model_key))


@st.cache_data(show_spinner=False, max_entries=64)
def decode(image_hash: str, name: str, _data: bytes):
    return logic.decode_image(_data, name)


@st.cache_data(show_spinner=False, max_entries=256)
def predict(model_key: str, image_hash: str, _image):
    return logic.top_classes(get_bundle(model_key), _image, k=5)


@st.cache_data(show_spinner=False, max_entries=32)
def features(model_key: str, image_hash: str, layer: str, n: int, _image):
    return logic.feature_grid_image(get_bundle(model_key), _image, layer, n)


def with_progress(model, bar, label: str, done: float, share: float, fn):
    """Run ``fn()`` while the bar names ``label`` and counts ``model``'s forward passes and seconds; the bar
    moves from ``done`` towards ``done + share`` (a method's total number of forwards is not known ahead)."""

    def report(n: int, seconds: float) -> None:
        bar.progress(min(done + share * 0.95, done + share * (1 - 1 / (1 + n / 8))),
                     text=f"{label}: {n} forward passes, {seconds:.0f} s")

    bar.progress(done, text=f"{label} ...")
    with logic.count_forwards(model, report):
        return fn()


@st.dialog("Explanation", width="large")
def show_large(original, original_caption: str, pic, caption: str) -> None:
    """One map large, beside the original (Esc or the cross closes it)."""
    a, b = st.columns(2)
    a.image(original, caption=original_caption, width="stretch")
    b.image(pic, caption=caption, width="stretch")


def _reset_model_choices() -> None:
    for key in ("layer", "feature_layer"):  # layer names belong to the previous model
        st.session_state.pop(key, None)


# ------------------------------------------------------------------------------------------------ page

# Less empty space above and beside the page than Streamlit's default, so the maps start above the fold on a
# 1280 x 720 window (only padding: if Streamlit renames the container, the page just keeps its default margins).
st.html("<style>[data-testid='stMainBlockContainer']{padding:3rem 2rem 2rem 2rem}</style>")
st.markdown("### lumos: where does the model look?")

# ---- task: classification (below), or the detection / segmentation views (lumos.app.task_page)
with st.sidebar:
    if TASK not in task_logic.TASKS:
        st.error(f"Unknown --task '{TASK}'; use one of {', '.join(task_logic.TASKS)}.")
    task = st.selectbox("Task", task_logic.TASKS, key="task",
                        index=task_logic.TASKS.index(TASK) if TASK in task_logic.TASKS else 0,
                        help="Detection and segmentation explain the shipped synthetic detector / segmenter.")
if task != "classification":
    from lumos.app import task_page

    task_page.run(task)
    st.stop()

# ---- sidebar: input, model and explanation settings
with st.sidebar:
    st.header("Image")
    if "uploader_key" not in st.session_state:
        st.session_state.uploader_key = 0
    # The uploader states the size limit itself ("Limit 20MB per file"): give it the app's limit (`lumos app`
    # also sets server.maxUploadSize to it), so the page states one limit. Older Streamlit has no max_upload_size.
    _limit = ({"max_upload_size": logic.MAX_UPLOAD_MB}
              if "max_upload_size" in inspect.signature(st.file_uploader).parameters else {})
    uploads = st.file_uploader(
        f"Upload images (at most {logic.MAX_PIXELS // 1_000_000} megapixels each)",
        type=logic.UPLOAD_TYPES, accept_multiple_files=True, key=f"uploader_{st.session_state.uploader_key}",
        **_limit,
    )
    st.caption("... or try an example photo:")
    with st.container(horizontal=True, gap="small"):
        for name in logic.EXAMPLES:
            if st.button(name, key=f"example_{name}"):
                st.session_state.example = name
                st.session_state.uploader_key += 1  # clears the uploader
                st.rerun()
    image_slot = st.empty()  # the image picker, when several are uploaded

    st.header("Model")
    choices = logic.model_choices(CONFIG)
    if len(choices) > 1:
        pick_model = st.selectbox("Model", range(len(choices)), key="model", on_change=_reset_model_choices,
                                  format_func=lambda i: logic.model_label(choices[i], CONFIG),
                                  help=logic.model_help(choices))
    else:
        pick_model = 0
    config = choices[pick_model or 0]
    MODEL_KEY = config.key()
    model_slot = st.empty()

try:
    with st.spinner(f"Loading model {config.model} ..."):
        bundle = get_bundle(MODEL_KEY)
except Exception as err:  # a model that fails to load: one message, nothing else to do
    st.error(f"Could not load the model {config.model}: {logic.describe_error(err)}")
    st.stop()

try:  # the attention methods only for a model with attention (on a CNN they can only fail)
    methods, withheld = logic.offered_methods(get_attention(MODEL_KEY))
except Exception:  # the model does not run on a blank image: offer everything, each method says what fails
    methods, withheld = logic.available_methods(), []
if "methods" in st.session_state:  # a method the previous model had and this one lacks
    st.session_state.methods = [m for m in st.session_state.methods if m in methods]

with st.sidebar:
    model_slot.caption(f"**{bundle.name or config.model}** on {logic.model_device(bundle.model)}"
                       + "".join(f" · {o}" for o in logic.model_options(config)))  # wraps: nothing cut off
    st.header("Explanation")
    chosen = st.multiselect("Methods", methods, default=["gradcam"] if "gradcam" in methods else methods[:1],
                            format_func=logic.display_name, key="methods")
    if withheld:
        st.caption(logic.withheld_note(withheld))
    try:
        layer_names, auto_layer = get_layers(MODEL_KEY)
    except Exception as err:
        st.warning(f"Could not list the layers: {logic.describe_error(err)}")
        layer_names, auto_layer = [], "?"
    layer_options = ["auto", *layer_names]
    layered = [logic.display_name(m) for m in chosen if logic.uses_layer(m)]

    def layer_text(n: str) -> str:  # an nn.Sequential's "7" reads "layer 7 (ReLU)", not as a number
        return logic.layer_label(n, bundle.model)

    def layer_choice(n: str) -> str:
        return f"auto ({layer_text(auto_layer)})" if n == "auto" else layer_text(n)

    layer = st.selectbox("Layer (CAM methods)", layer_options, key="layer", format_func=layer_choice,
                         help="Used by " + (", ".join(layered) if layered else "none of the chosen methods")
                         + "; the others ignore it, so changing it recomputes only these.")
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
    per_row = st.slider("Images per row", 1, 6, 3, 1, key="per_row",
                        help="Fewer per row: larger maps. Each map also has an Enlarge button.")

# ---- input
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
        st.info("Upload an image or pick an example in the sidebar to see what the model predicts, and why.")
    st.stop()

if len(images) > 1:
    with image_slot.container():
        pick = st.radio("Image", range(len(images)), format_func=lambda i: images[i][0], key="pick")
else:
    pick = 0
image_name, image_hash, image = images[pick]
original_caption = f"original: {image_name}{logic.enlargement_note(image.size, bundle.preprocess.size)}"

# ---- prediction and class choice (left), explanations (right): all above the fold
try:
    with st.spinner("Predicting ..."):
        top = predict(MODEL_KEY, image_hash, image)
except Exception as err:
    st.error(f"Could not run the model on {image_name}: {logic.describe_error(err)}")
    st.stop()

left, right = st.columns([1, 3], gap="medium")
with left:
    st.markdown("**Top-5 predictions**")
    st.markdown(logic.top5_html(top), unsafe_allow_html=True)

    top5_key = f"top5_{image_hash}_{MODEL_KEY}"

    def _clear_search() -> None:
        st.session_state.search = ""

    def _clear_top5() -> None:
        if st.session_state.get("search"):
            st.session_state[top5_key] = None

    top_choice = st.radio("Class to explain", range(len(top)), key=top5_key,
                          format_func=lambda j: f"{top[j][1]} ({top[j][2]:.2f})", on_change=_clear_search)
    names = get_class_names(MODEL_KEY)
    searched = None
    if names:
        query = st.text_input("... or search any class", key="search", placeholder=logic.search_placeholder(names),
                              on_change=_clear_top5)
        if query and query.strip():
            found = logic.search_classes(names, query)
            if found:
                # keyed by the query: a new search starts at its best match
                pos = st.selectbox(f"{len(found)} matching class{'es' if len(found) > 1 else ''}", found,
                                   key=f"search_pick_{query.strip().lower()}", format_func=names.__getitem__)
                searched = int(names[pos].split(":", 1)[0])
            else:
                st.caption(f"No class matches '{query.strip()}'.")
    target = searched if searched is not None else top[0 if top_choice is None else top_choice][0]
    label_of = (lambda i: bundle.labels[i]) if bundle.labels is not None else (lambda i: f"class {i}")  # noqa: E731
    st.caption(f"Explaining class **{target}: {label_of(target)}**")

results: dict[str, logic.MethodResult] = {}
rendered = {}
stem = image_name.rsplit(".", 1)[0]
with right:
    if not chosen:
        st.info("Choose at least one method in the sidebar.")
    progress_slot = st.empty()
    entries = ["original", *chosen]
    slots = {}
    for start in range(0, len(entries), per_row):
        for col, entry in zip(st.columns(per_row), entries[start:start + per_row], strict=False):
            slots[entry] = col.empty()
    slots["original"].image(image, caption=original_caption, width="stretch")

    def show(m: str, res) -> None:
        if isinstance(res, str):  # a failure, kept so that an unrelated change does not retry it
            slots[m].error(logic.method_error(m, res))
            return
        pic = logic.render_result(image, res, colormap, alpha)
        results[m], rendered[m] = res, pic
        caption = logic.result_caption(res, None if res.target is None else label_of(res.target), bundle.model)
        with slots[m].container():
            st.image(pic, caption=caption, width="stretch")
            with st.container(horizontal=True, gap="small"):
                if st.button("Enlarge", key=f"big_{m}", type="tertiary", icon=":material/open_in_full:"):
                    show_large(image, original_caption, pic, caption)
                st.download_button("PNG", lambda pic=pic: logic.png_bytes(pic), f"{stem}_{logic.file_stem(m)}.png",
                                   "image/png", key=f"png_{m}", on_click="ignore", type="tertiary")
                st.download_button("npy", lambda res=res: logic.npy_bytes(res.raw),
                                   f"{stem}_{logic.file_stem(m)}_raw.npy", "application/octet-stream",
                                   key=f"npy_{m}", on_click="ignore", type="tertiary",
                                   help="The raw map: layer resolution for CAMs, the signed C x H x W attribution "
                                        "for pixel methods.")

    keys = {m: logic.result_key(MODEL_KEY, image_hash, m, target, layer, settings.get(m, {})) for m in chosen}
    todo = [m for m in chosen if keys[m] not in logic.RESULTS]
    for m in chosen:
        if m not in todo:
            show(m, logic.RESULTS.get(keys[m]))
    if todo:
        bar = progress_slot.progress(0.0)
        for i, m in enumerate(todo):
            slots[m].caption(f"{logic.display_name(m)}: computing ...")
            label = f"{logic.display_name(m)} ({i + 1} of {len(todo)})"
            try:
                res = with_progress(bundle.model, bar, label, i / len(todo), 1 / len(todo),
                                    lambda m=m: logic.run_method(bundle, image, m, target, layer, settings.get(m, {})))
            except Exception as err:
                res = logic.describe_error(err)
            logic.RESULTS.put(keys[m], res)
            show(m, res)
        progress_slot.empty()
    if results:
        st.markdown(logic.colour_key_html(list(results.values()), colormap), unsafe_allow_html=True)
        st.download_button(
            "Download everything (ZIP)",
            lambda: logic.build_zip(image_name, image, results, rendered, top),
            f"{stem}_lumos.zip", "application/zip", key="zip", on_click="ignore",
        )

# ---- feature maps
with st.expander("Feature-map browser"):
    fcol1, fcol2 = st.columns([2, 1])
    f_layer = fcol1.selectbox("Layer", layer_options, key="feature_layer", format_func=layer_choice)
    f_n = fcol2.slider("Channels", 4, 64, 16, 4, key="feature_n")
    if st.toggle("Show the most active channels", key="feature_show"):
        try:
            with st.spinner("Recording feature maps ..."):
                grid, f_name, channels = features(MODEL_KEY, image_hash, f_layer, f_n, image)
            st.image(grid, caption=f"{layer_text(f_name)}: top {len(channels)} channels by mean activation")
        except Exception as err:
            st.error(logic.describe_error(err))

# ---- evaluation: only on request (it costs two curves of forwards per method)
if logic.evaluation_available():
    with st.expander("Evaluation: deletion / insertion"):
        st.caption("Deletion removes the most important pixels first (a faithful map makes the probability fall: "
                   "lower AUC is better); insertion restores them into a blurred image (higher AUC is better).")
        steps = st.slider("Steps", 5, 50, 20, 5, key="eval_steps")
        eval_key = json.dumps([sorted(keys[m] for m in results), target, steps])
        requested = st.session_state.setdefault("eval_requested", set())
        if st.button("Score the shown maps", key="eval_run", disabled=not results):
            requested.add(eval_key)
        if eval_key in requested:
            curves = logic.CURVES.get(eval_key)
            if curves is None:
                bar = st.progress(0.0)
                try:
                    maps = {m: r.map for m, r in results.items()}
                    curves = with_progress(bundle.model, bar, "Deletion and insertion", 0.0, 1.0,
                                           lambda: logic.deletion_insertion(bundle, image, maps, target, steps))
                    logic.CURVES.put(eval_key, curves)
                except Exception as err:
                    st.error(logic.describe_error(err))
                bar.empty()
            if curves is not None:
                st.pyplot(logic.curves_figure(curves))
                st.dataframe({"method": [logic.display_name(m) for m in curves],
                              "deletion AUC": [c.deletion_auc for c in curves.values()],
                              "insertion AUC": [c.insertion_auc for c in curves.values()]}, hide_index=True,
                             column_config={c: st.column_config.NumberColumn(format="%.3f")  # as in the legend
                                            for c in ("deletion AUC", "insertion AUC")})
                blank = [logic.display_name(m) for m, c in curves.items() if not c.defined]
                if blank:
                    st.caption(f"Undefined for {', '.join(blank)}: a blank map ranks no pixel, so it has no "
                               "deletion or insertion curve.")
        elif results:
            st.caption(f"Press the button to score the maps shown for class {target} "
                       f"({len(results)} method{'s' if len(results) > 1 else ''}, {steps} steps).")
