"""Deployment on Flower's runtime: SuperLink and SuperNodes, locally or with docker-compose."""
