"""The app's detection and segmentation views (``lumos app --task detection|segmentation``, or the sidebar's task
choice): the shipped synthetic detector / segmenter on an uploaded scene or an example scene.

Detection: the image with its boxes (class, score), a list of the boxes, the chosen box's explanation with the
box drawn on it. Segmentation: the predicted class regions, a list of the classes, the chosen class region's
explanation with the region outlined. The logic is in ``lumos.app.task_logic``.
"""

from __future__ import annotations

import streamlit as st

from lumos.app import logic, task_logic


@st.cache_resource(show_spinner=False)
def get_task_model(task: str) -> task_logic.TaskModel:
    return task_logic.load_task_model(task)


def _sidebar(task: str) -> tuple[list[tuple[str, bytes]], str, dict, float, str, float]:
    """Input, method, settings and display choices; returns (sources, method, settings, score, colormap, alpha)."""
    with st.sidebar:
        st.header("Scene")
        st.session_state.setdefault("task_uploader_key", 0)
        uploads = st.file_uploader(f"Upload a scene (resized to {task_logic.SIZE} x {task_logic.SIZE})",
                                   type=logic.UPLOAD_TYPES, key=f"task_uploader_{st.session_state.task_uploader_key}")
        st.caption("... or try an example scene:")
        with st.container(horizontal=True, gap="small"):
            for name in task_logic.SCENES:
                if st.button(name, key=f"scene_{name}"):
                    st.session_state.scene = name
                    st.session_state.task_uploader_key += 1  # clears the uploader
                    st.rerun()
        st.header("Model")
        st.caption(f"Shipped synthetic {'detector' if task == 'detection' else 'segmenter'} "
                   f"({task_logic.SIZE} px scenes; classes disc, square, triangle, plus)")
        score = (st.slider("Score threshold", 0.05, 0.95, 0.5, 0.05, key="task_score",
                           help="Boxes whose best class scores at least this are shown.")
                 if task == "detection" else 0.5)
        st.header("Explanation")
        methods = task_logic.task_methods()
        method = st.selectbox("Method", methods, index=methods.index("gradcam") if "gradcam" in methods else 0,
                              format_func=logic.display_name, key="task_method")
        settings = {}
        for s in logic.method_settings(method):
            key = f"task_set_{method}_{s.param}"
            if s.kind == "int":
                settings[s.param] = st.slider(s.label, int(s.low), int(s.high), int(s.default), int(s.step), key=key)
            elif s.kind == "float":
                settings[s.param] = st.slider(s.label, float(s.low), float(s.high), float(s.default),
                                              float(s.step), key=key)
            else:
                settings[s.param] = st.selectbox(s.label, list(s.options), index=list(s.options).index(s.default),
                                                 key=key)
        st.header("Display")
        colormap = st.selectbox("Colormap", ["jet", "turbo", "viridis", "inferno", "magma", "plasma", "hot"],
                                key="task_colormap")
        alpha = st.slider("Opacity", 0.0, 1.0, 0.5, 0.05, key="task_alpha")
    if uploads is not None:
        st.session_state.pop("scene", None)
        return [(uploads.name, uploads.getvalue())], method, settings, score, colormap, alpha
    if st.session_state.get("scene"):
        name = st.session_state.scene
        return [(f"{name}.png", task_logic.scene_png(name))], method, settings, score, colormap, alpha
    return [], method, settings, score, colormap, alpha


def _explained(key: str, label: str, fn):
    """A cached result (``logic.RESULTS``), computed under a spinner the first time; a failure is kept as text."""
    if key not in logic.RESULTS:
        with st.spinner(f"{label} ..."):
            try:
                logic.RESULTS.put(key, fn())
            except Exception as err:
                logic.RESULTS.put(key, logic.describe_error(err))
    return logic.RESULTS.get(key)


def _show(column, key: str, display: str, what: str, explain, draw) -> None:
    """The explanation of ``what`` (cached under ``key``) drawn in ``column`` with its caption, or its error."""
    res = _explained(key, f"{display} for {what}", explain)
    if isinstance(res, str):
        column.error(f"{display}: {res}")
        return
    layer = f" @ {res.layer}" if res.layer and res.kind == "layer" else ""
    note = " (zero everywhere, nothing to draw: the exact result)" if not res.map.any() else (
        f" ({res.shortfall})" if res.shortfall else "")
    column.image(draw(res), width="stretch", caption=f"{display}{layer}: {what}{note}")


def run(task: str) -> None:
    """Draw the whole task view (sidebar and main area)."""
    sources, method, settings, score, colormap, alpha = _sidebar(task)
    try:
        tm = get_task_model(task)
    except Exception as err:
        st.error(f"Could not load the shipped {task} model: {logic.describe_error(err)}")
        return
    if not sources:
        st.info(f"Upload a scene or pick an example scene in the sidebar to see its "
                f"{'detections' if task == 'detection' else 'class regions'}, and explain one.")
        return
    name, data = sources[0]
    try:
        image = logic.decode_image(data, name)
    except Exception as err:
        st.error(logic.describe_error(err))
        return
    image_hash = logic.digest(data)
    display = logic.display_name(method)
    left, middle, right = st.columns([2, 1, 2], gap="medium")

    if task == "detection":
        det = task_logic.find_boxes(tm, image, score)
        left.image(task_logic.boxes_image(tm, image, det), width="stretch",
                   caption=f"{name}: {len(det)} detection{'s' if len(det) != 1 else ''} (score >= {score:.2f})")
        if not len(det):
            middle.info(f"No detection scores {score:.2f} or more; lower the score threshold in the sidebar.")
            return
        choices = task_logic.box_choices(det, tm.names)
        k = middle.radio("Box to explain", range(len(det)), format_func=choices.__getitem__,
                         key=f"task_box_{image_hash}_{score}")
        box = [round(float(v), 2) for v in det.boxes[k]] + [int(det.labels[k])]
        key = task_logic.result_key(task, image_hash, box, method, settings)
        _show(right, key, display, choices[k], lambda: task_logic.explain_box(tm, image, det, k, method, settings),
              lambda res: task_logic.render_box(tm, image, det, k, res, colormap, alpha))
        return

    pred = task_logic.predicted_mask(tm, image)
    left.image(task_logic.segments_image(tm, image, pred), width="stretch",
               caption=f"{name}: predicted class regions")
    classes = task_logic.class_choices(pred, tm.names)
    left.markdown(task_logic.legend_html(classes, tm.names), unsafe_allow_html=True)  # which tint is which class
    if not classes:
        middle.info("The model predicts only background in this image.")
        return
    j = middle.radio("Class to explain", range(len(classes)), format_func=lambda i: classes[i][1],
                     key=f"task_class_{image_hash}")
    category = classes[j][0]
    key = task_logic.result_key(task, image_hash, category, method, settings)
    _show(right, key, display, f"{tm.names[category]} region",
          lambda: task_logic.explain_class(tm, image, category, method, settings),
          lambda res: task_logic.render_class(tm, image, pred, category, res, colormap, alpha))
