from django.apps import AppConfig


class MarketplaceConfig(AppConfig):
    name = "marketplace"
    verbose_name = "Marketplace"

    def ready(self):
        # Provisioning reports command outcomes, and asks who may see a node and who holds its GPUs, through
        # hooks; it never imports marketplace. Imported in ready(): the services and selectors import
        # models, which cannot load before the app registry is populated.
        from marketplace.selectors.capacity import node_gpu_holdings
        from marketplace.services.reservations import provisioning as provisioning_flow
        from provisioning import hooks

        hooks.on_command_finished(provisioning_flow.on_command_finished)
        hooks.on_command_progress(provisioning_flow.on_command_progress)
        hooks.on_node_audience(provisioning_flow.node_audience)
        hooks.on_node_occupancy(node_gpu_holdings)  # a node's GPUs over time, on its admin page
