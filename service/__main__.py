"""``python -m service``: serve the app with uvicorn, every setting from REID_* environment variables."""
import logging

import uvicorn

from service.app import create_app
from service.server import protocol_class
from service.settings import Settings


def main() -> None:
    settings = Settings()
    logging.basicConfig(level=settings.log_level.upper(), format='{"time": "%(asctime)s", "level": "%(levelname)s", "logger": "%(name)s", "message": "%(message)s"}')
    # http: uvicorn's httptools protocol with deadlines and limits for slow clients (service.server);
    # ws: the API has no WebSocket routes, so an upgrade request is answered as plain HTTP
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level, access_log=False,
                http=protocol_class(settings), ws="none")


if __name__ == "__main__":
    main()
