"""The chat's image from a local path or an http(s) URL, as LLaVA's CLI takes `--image-file`."""

from __future__ import annotations

from io import BytesIO
from urllib.error import HTTPError, URLError
from urllib.parse import urlparse
from urllib.request import urlopen

from PIL import Image

from llava.mm_utils import ImageLoadError, load_image

URL_SCHEMES = ("http", "https")
DOWNLOAD_TIMEOUT_S = 30


def open_image(source: str) -> Image.Image:
    """The image at `source` as RGB, decoded now; ImageLoadError names the source if it cannot be had."""
    if urlparse(source).scheme not in URL_SCHEMES:
        return load_image(source)
    try:
        with urlopen(source, timeout=DOWNLOAD_TIMEOUT_S) as response:
            data = response.read()
    except HTTPError as error:  # says the status: "HTTP Error 404: Not Found"
        raise ImageLoadError(f"cannot download image {source}: {error}") from None
    except URLError as error:  # says why there was no answer: "[Errno 111] Connection refused"
        raise ImageLoadError(f"cannot download image {source}: {error.reason}") from None
    except (OSError, ValueError) as error:  # a timeout mid-download, a malformed URL
        raise ImageLoadError(f"cannot download image {source}: {error}") from None
    return load_image(BytesIO(data), name=source)
