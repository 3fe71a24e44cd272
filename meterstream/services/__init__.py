"""Local, Docker-free services (the Kafka broker) for development and tests."""
