"""Form fields that are text or refused. Starlette decodes a multipart form field that is not valid in its
charset (UTF-8 unless the form says otherwise) as Latin-1, so bytes that are not text would be stored as
mojibake ids and metadata; ``StrictMultiPartParser`` refuses them with 400 ``invalid_body`` instead. File
names keep Starlette's fallback: they are never stored."""

import starlette.requests
from starlette.formparsers import MultiPartException, MultiPartParser


class StrictMultiPartParser(MultiPartParser):
    def on_part_end(self) -> None:
        part = self._current_part
        if part.file is None:
            try:
                bytes(part.data).decode(self._charset)
            except (UnicodeDecodeError, LookupError):
                raise MultiPartException(f"form field {part.field_name!r} is not valid {self._charset} text") from None
        super().on_part_end()


def install_strict_form_parsing() -> None:
    """Make every ``Request.form()`` of this process use ``StrictMultiPartParser`` (Starlette has no option)."""
    starlette.requests.MultiPartParser = StrictMultiPartParser
