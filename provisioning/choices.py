from django.db import models


class SiteKind(models.TextChoices):
    HALL = "hall", "Training hall"
    EDGE = "edge", "Edge site"


class Vendor(models.TextChoices):
    NVIDIA = "nvidia", "NVIDIA"
    AMD = "amd", "AMD"
    INTEL = "intel", "Intel"
    OTHER = "other", "Other"


class Purpose(models.TextChoices):
    TRAINING = "training", "Training"
    INFERENCE = "inference", "Inference"
    BOTH = "both", "Training and inference"


class NodeState(models.TextChoices):
    ENROLLING = "enrolling", "Enrolling"
    AVAILABLE = "available", "Available"
    DRAINING = "draining", "Draining"
    MAINTENANCE = "maintenance", "Maintenance"
    OFFLINE = "offline", "Offline"


class CommandKind(models.TextChoices):
    PROVISION = "provision", "Provision"
    RELEASE = "release", "Release"
    HEALTH_CHECK = "health_check", "Health check"
    ACCESS = "access", "Update access"


class CommandState(models.TextChoices):
    QUEUED = "queued", "Queued"
    SENT = "sent", "Sent"
    ACKNOWLEDGED = "acknowledged", "Acknowledged"
    SUCCEEDED = "succeeded", "Succeeded"
    FAILED = "failed", "Failed"
