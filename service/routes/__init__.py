"""The HTTP routes, one module per area: ``health`` (liveness, readiness, the model, metrics), ``gallery``
(enrol, list, read, delete, erase a person) and ``query`` (query, batch query, verify); ``common`` has what
they share: the ready state, the API key's declaration and the error responses. Each module's ``add_routes``
adds plain routes to the app rather than an included router, so that every route stays on the app's own list,
where the 405 handler reads the Allow header from.

Import rules: routes read the ready service through ``common.state`` (``service.serving.Serving``: settings,
metrics, model, gallery, batcher, decoder, query answerer), and ``request.app.state``'s settings and metrics
before it is ready; they import ``service`` modules, never ``service.app``."""
