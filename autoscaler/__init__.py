"""dgpt's custom autoscaler: frozen context, pure policies, decisions, one actuator, the loop."""
