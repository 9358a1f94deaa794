from django.apps import AppConfig


class ConsoleConfig(AppConfig):
    name = "console"
    verbose_name = "Neocloud Console"

    def ready(self):
        from django.contrib.auth.signals import user_logged_out

        user_logged_out.connect(_close_session_feeds, dispatch_uid="console.close_session_feeds")


def _close_session_feeds(sender, request, user, **kwargs):
    """Signing out (portal or admin) closes the live feeds that session opened, in every process."""
    from console.events import feeds_close_on_commit, session_group

    session_key = getattr(getattr(request, "session", None), "session_key", None)
    if session_key:
        feeds_close_on_commit(session_group(session_key))
