"""fleetlet-operator: FleetJobs become verified results on parked cars (kopf)."""
