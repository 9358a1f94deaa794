"""Inference endpoints: the models operators serve, the endpoints tenants own, and their replicas."""
