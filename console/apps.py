from django.apps import AppConfig

from console.kernel.events import feeds_close_on_commit, session_group


class ConsoleConfig(AppConfig):
    name = "console"
    verbose_name = "Neocloud Console"

    def ready(self):
        # Imported here, not at the top: apps.py is loaded while the app registry is being populated, and
        # throttling pulls in DRF's settings and views and the auth signals, which need it populated.
        from django.contrib.auth.signals import user_logged_in, user_logged_out, user_login_failed
        from django.core import checks

        from console.kernel import throttling

        checks.register(throttling.check_rates)
        user_logged_out.connect(_close_session_feeds, dispatch_uid="console.close_session_feeds")
        user_login_failed.connect(throttling.signin_failed, dispatch_uid="console.signin_failed")
        user_logged_in.connect(throttling.signin_succeeded, dispatch_uid="console.signin_succeeded")


def _close_session_feeds(sender, request, user, **kwargs):
    """Signing out (portal or admin) closes the live feeds that session opened, in every process."""
    session_key = getattr(getattr(request, "session", None), "session_key", None)
    if session_key:
        feeds_close_on_commit(session_group(session_key))
