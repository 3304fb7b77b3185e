"""Saving one scene's 3D reconstruction to disk: coloured point cloud (PLY), scene with camera frustums (GLB), camera
poses (JSON), per-view 16-bit depth maps (PNG) and a COLMAP text model.

All inputs are for ONE scene, shaped like [`G2VLMReconstructionOutput`] without its batch dimension (index the scene
first, e.g. `output.world_points[0]`). Coordinates are written unchanged, in the model's world frame (the first
camera's OpenCV frame: x right, y down, z forward), so Y-up viewers may show the scene upside down.

Every file is written atomically (`atomic.py`): a failure never leaves a partial file behind. The public functions
check their arrays once (`validation.py`) and hand them to writers that do not check again.

`trimesh` is an optional dependency: `pip install "g2vlm-hf[export]"`.

Modules: `validation` (input checks), `atomic` (the file writer), `points` (which points are kept), `ply`, `glb`,
`cameras` (`cameras.json`), `depth_png` (the depth PNG codec and previews), `scene` (all of one scene's files) and
`colmap` (a COLMAP text model).
"""

from .cameras import save_cameras_json
from .colmap import ColmapExportOptions, export_colmap, rotation_to_quaternion, write_colmap
from .depth_png import colourise_depth, load_depth_png16, save_depth_png16, save_depth_preview
from .glb import DEFAULT_FRUSTUM_SCALE, robust_scene_scale, save_scene_glb, view_colours
from .ply import save_point_cloud_ply
from .points import compute_keep_mask, filter_points
from .scene import SceneExportOptions, export_model_scene, export_reconstruction, write_scene
from .validation import SceneArrays, check_reconstruction, check_scene

__all__ = [
    "DEFAULT_FRUSTUM_SCALE",
    "ColmapExportOptions",
    "SceneArrays",
    "SceneExportOptions",
    "check_reconstruction",
    "check_scene",
    "colourise_depth",
    "compute_keep_mask",
    "export_colmap",
    "export_model_scene",
    "export_reconstruction",
    "filter_points",
    "load_depth_png16",
    "robust_scene_scale",
    "rotation_to_quaternion",
    "save_cameras_json",
    "save_depth_png16",
    "save_depth_preview",
    "save_point_cloud_ply",
    "save_scene_glb",
    "view_colours",
    "write_colmap",
    "write_scene",
]
