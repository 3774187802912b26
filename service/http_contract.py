"""HTTP details the API keeps on every route: HEAD answered like GET without a body, and stored images served
with a standard content type that browsers will not sniff into something else."""

from typing import Dict

# PIL's format names as standard media types. MPO (a phone's multi-picture JPEG) is a JPEG to every viewer;
# formats with no standard type (XBM, PCX, ICNS...) go out as bytes, never as an image/* type a browser guesses at.
IMAGE_MEDIA_TYPES = {
    "JPEG": "image/jpeg",
    "MPO": "image/jpeg",
    "PNG": "image/png",
    "GIF": "image/gif",
    "WEBP": "image/webp",
    "BMP": "image/bmp",
    "TIFF": "image/tiff",
    "AVIF": "image/avif",
}
OPAQUE = "application/octet-stream"
NO_SNIFF = {"X-Content-Type-Options": "nosniff"}


def image_headers(image_format: str) -> Dict[str, str]:
    return {"Content-Type": IMAGE_MEDIA_TYPES.get(image_format.upper(), OPAQUE), **NO_SNIFF}


class HeadAsGet:
    """Answer HEAD on any route as its GET, headers alone (FastAPI routes declared with GET refuse HEAD)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "HEAD":
            return await self.app(scope, receive, send)

        async def headers_only(message):
            if message["type"] == "http.response.body":
                if message.get("more_body", False):
                    return
                message = {"type": "http.response.body", "body": b""}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, headers_only)
