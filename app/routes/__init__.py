"""One APIRouter per resource; `ROUTERS` is what `create_app` includes."""

from app.routes import attack, certify, classify, examples, health, metrics, models, pages, v2

ROUTERS = (classify.router, attack.router, certify.router, examples.router, models.router, health.router,
           metrics.router, pages.router, v2.router)
