"""fmnist: a Fashion-MNIST classifier served behind Kafka or Google Cloud Pub/Sub."""

__version__ = "0.1.0"
