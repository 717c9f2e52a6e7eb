"""tidegate for CTFd: per-team challenge instances run by a tidegate cluster.

Drop this folder into `CTFd/plugins/tidegate/` (the folder must be named
`tidegate`). See integrations/ctfd/README.md in the tidegate repository.

Nothing here calls tidegate at import or load time: CTFd starts and serves
its pages whether tidegate is up or not.
"""

from CTFd.plugins import (
    register_admin_plugin_menu_bar,
    register_plugin_assets_directory,
)
from CTFd.plugins.challenges import CHALLENGE_CLASSES
from CTFd.plugins.migrations import upgrade

from .challenge import TidegateChallengeType
from .models import TidegateChallenge, TidegateFlagSharing  # noqa: F401 (tables)
from .views import PLUGIN_DIR, tidegate_bp

__version__ = "0.1.0"


def load(app):
    # SQLite: create_all; MySQL/PostgreSQL: this folder's migrations/.
    upgrade(plugin_name=PLUGIN_DIR)
    CHALLENGE_CLASSES["tidegate"] = TidegateChallengeType
    register_plugin_assets_directory(app, base_path="/plugins/tidegate/assets/")
    app.register_blueprint(tidegate_bp)
    register_admin_plugin_menu_bar("Instances", "/admin/tidegate/instances")
    register_admin_plugin_menu_bar("Flag sharing", "/admin/tidegate/flag-sharing")
    register_admin_plugin_menu_bar("tidegate config", "/admin/tidegate/config")
