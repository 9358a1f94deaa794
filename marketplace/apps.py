from django.apps import AppConfig


class MarketplaceConfig(AppConfig):
    name = "marketplace"
    verbose_name = "Marketplace"

    def ready(self):
        # Provisioning reports command outcomes, and asks who may see a node and who holds its GPUs, through
        # hooks; it never imports marketplace. Imported in ready(): the services and selectors import
        # models, which cannot load before the app registry is populated.
        from marketplace.selectors.capacity import node_gpu_holdings
        from marketplace.services.endpoints import replicas
        from marketplace.services.reservations import access
        from marketplace.services.reservations import provisioning as provisioning_flow
        from marketplace.services.tenancy import ssh_keys
        from provisioning import hooks

        hooks.on_command_finished(provisioning_flow.on_command_finished)
        hooks.on_command_progress(provisioning_flow.on_command_progress)
        hooks.on_node_audience(provisioning_flow.node_audience)
        hooks.on_node_occupancy(node_gpu_holdings)  # a node's GPUs over time, on its admin page
        # Replicas of inference endpoints rent reservations: their commands carry the server to run, and
        # a provisioned one reports its address (after the reservation's own hook has moved it).
        provisioning_flow.on_provision_params(replicas.serve_params)
        hooks.on_command_finished(replicas.on_command_finished)
        hooks.on_workload_reported(replicas.on_workload_reported)  # a replica's server stopped answering
        # Deleted SSH keys (by their owner, or with a leaving member) leave the reservations that had them.
        ssh_keys.on_keys_removed(access.keys_removed)
