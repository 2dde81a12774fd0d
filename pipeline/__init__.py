"""Orchestration: plans stages into parts, runs them on Ray, resumes, and records manifests."""
