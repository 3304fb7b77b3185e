"""What a command reads: image files, folders of views and videos (lazily, upright), the one list of image suffixes,
the one frame naming, the views' original sizes and their count checked before any pixel is decoded.

Used by the command lines, the evaluation and the demo; imports nothing above it (no model, no command line)."""

from .errors import InputError
from .images import IMAGE_SUFFIXES, images_in_folder, is_image_file, original_sizes
from .video import count_video_frames, frame_name, iter_video_frames, require_pyav, uniform_indices, upright
from .views import (
    ViewSource,
    folder_views,
    image_views,
    open_views,
    spread_video_views,
    video_frames,
    video_views,
)

__all__ = [
    "IMAGE_SUFFIXES",
    "InputError",
    "ViewSource",
    "count_video_frames",
    "folder_views",
    "frame_name",
    "image_views",
    "images_in_folder",
    "is_image_file",
    "iter_video_frames",
    "open_views",
    "original_sizes",
    "require_pyav",
    "spread_video_views",
    "uniform_indices",
    "upright",
    "video_frames",
    "video_views",
]
