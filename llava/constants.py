"""Constants shared by the prompt, image and generation code (LLaVA's names, so user code keeps working)."""

IMAGE_TOKEN_INDEX = -200  # sentinel id in input_ids where the vision tokens are spliced in
IGNORE_INDEX = -100

DEFAULT_IMAGE_TOKEN = "<image>"
DEFAULT_IMAGE_PATCH_TOKEN = "<im_patch>"
DEFAULT_IM_START_TOKEN = "<im_start>"
DEFAULT_IM_END_TOKEN = "<im_end>"
