import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "orchestrator_site.settings")

from orchestrator_site.relaying import WsgiTicketGuard  # noqa: E402 (after the settings module is set)

application = WsgiTicketGuard(get_wsgi_application())
