"""One APIRouter per resource; `ROUTERS` is what `create_app` includes."""

from app.routes import attack, classify, examples, health, metrics, models, pages, v2

ROUTERS = (classify.router, attack.router, examples.router, models.router, health.router, metrics.router,
           pages.router, v2.router)
