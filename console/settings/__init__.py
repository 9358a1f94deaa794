"""Settings profiles: ``development`` (default for manage.py), ``test`` and ``production``.

Every value comes from the environment (see README, "Configuration"); the profiles only choose
defaults and how strict to be about what is missing.
"""
