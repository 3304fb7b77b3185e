"""A depth-estimation pipeline that also takes several views of ONE scene, reconstructed together.

transformers' own `pipeline("depth-estimation", model=folder)` works on G²VLM (one image per input, each on its own).
To give the model several views of one scene at once (so that they share one reconstruction), pass this class:

    from transformers import pipeline
    from g2vlm_hf.pipelines import G2VLMDepthEstimationPipeline

    estimator = pipeline("depth-estimation", model=folder, pipeline_class=G2VLMDepthEstimationPipeline)
    estimator("view_0.png")                          # one image: a dict, as the standard pipeline
    estimator([["view_0.png", "view_1.png"]])        # one scene of two views: [[dict per view]]
"""

from __future__ import annotations

from typing import Any

from transformers.pipelines import DepthEstimationPipeline

from .processing.image_io import load_image

__all__ = ["G2VLMDepthEstimationPipeline"]


class G2VLMDepthEstimationPipeline(DepthEstimationPipeline):
    """[`~transformers.DepthEstimationPipeline`] where an input may be a list of views of one scene (reconstructed
    together); its result is then a list with one `{"predicted_depth", "depth"}` per view, each at its image's size.
    Images are read as the G2VLM processor reads them (16-bit, grayscale and transparent images converted to 8-bit RGB
    without clipping, EXIF orientation applied)."""

    def preprocess(self, image: Any, timeout: float | None = None) -> dict[str, Any]:
        if not isinstance(image, (list, tuple)):
            return super().preprocess(load_image(image), timeout)
        if not image:
            raise ValueError("A scene needs at least one view.")
        views = [load_image(view) for view in image]
        model_inputs = self.image_processor(images=[views], return_tensors="pt")
        model_inputs = model_inputs.to(self.dtype)
        model_inputs["target_size"] = [view.size[::-1] for view in views]
        return model_inputs

    def postprocess(self, model_outputs: Any) -> Any:
        target = model_outputs["target_size"]
        if not (isinstance(target, list) and target and isinstance(target[0], (list, tuple))):
            return super().postprocess(model_outputs)
        results = []
        for view, size in enumerate(target):  # one view at a time through the standard formatting
            single = dict(model_outputs)
            single["predicted_depth"] = model_outputs["predicted_depth"][view : view + 1]
            single["target_size"] = size
            results.append(super().postprocess(single))
        return results
