"""``python -m service``: serve the app with uvicorn, every setting from REID_* environment variables.

``python -m service backup FILE`` and ``python -m service restore FILE`` copy the gallery at REID_STORE_PATH to
one file and back (service.backup)."""

import argparse
import logging
import sys
from typing import Callable, List, Optional

from service.settings import Settings


def serve(settings: Settings) -> None:
    # imported here: backup and restore need neither the model runtime nor the web stack
    import uvicorn

    from service.app import create_app
    from service.log_throttle import throttle_repeats
    from service.server import protocol_class

    logging.basicConfig(
        level=settings.log_level.upper(),
        format='{"time": "%(asctime)s", "level": "%(levelname)s", "logger": "%(name)s", "message": "%(message)s"}',
    )
    # http: uvicorn's httptools protocol with deadlines and limits for slow clients (service.server);
    # ws: the API has no WebSocket routes, so an upgrade request is answered as plain HTTP
    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,
        http=protocol_class(settings),
        ws="none",
    )
    throttle_repeats("", "uvicorn")  # after uvicorn.Config, which sets up uvicorn's handlers

    class AnnouncedServer(uvicorn.Server):
        """Says once, whatever the log level, when the socket is listening and the model and gallery are loaded."""

        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.started:
                print(
                    f"ready: http://{settings.host}:{settings.port}/ (model {settings.model_path.name}, gallery "
                    f"{settings.store_path})",
                    file=sys.stderr,
                    flush=True,
                )

    AnnouncedServer(config).run()


def run_backup(settings: Settings, args: argparse.Namespace) -> str:
    from service.backup import backup

    done = backup(settings.store_path, args.file, force=args.force)
    return f"backed up {done} from {settings.store_path} to {args.file}"


def run_restore(settings: Settings, args: argparse.Namespace) -> str:
    from service.backup import restore

    done = restore(args.file, settings.store_path, replace=args.replace)
    return f"restored {done} from {args.file} to {settings.store_path}"


def parse(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m service",
        description="Serve the re-ID API (no command), or back "
        "up or restore "
        "the gallery at REID_STORE_PATH; every setting comes from REID_* environment "
        "variables.",
    )
    commands = parser.add_subparsers(dest="command")
    backup = commands.add_parser(
        "backup", help="write a consistent copy of the gallery to FILE (safe while a server runs)"
    )
    backup.add_argument("file", metavar="FILE")
    backup.add_argument("--force", action="store_true", help="overwrite FILE if it exists")
    backup.set_defaults(action=run_backup)
    restore = commands.add_parser("restore", help="make the backup FILE the gallery (no server may be running on it)")
    restore.add_argument("file", metavar="FILE")
    restore.add_argument("--replace", action="store_true", help="overwrite a gallery that holds items")
    restore.set_defaults(action=run_restore)
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> None:
    args = parse(argv)
    settings = Settings()
    if args.command is None:
        serve(settings)
        return
    from service.backup import NotAGallery, Refused
    from service.store import StoreInUse

    action: Callable[[Settings, argparse.Namespace], str] = args.action
    try:
        print(action(settings, args))
    except (NotAGallery, Refused, StoreInUse, OSError) as exc:
        sys.exit(f"{args.command} refused: {exc}")


if __name__ == "__main__":
    main()
