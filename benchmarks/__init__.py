"""Side-by-side benchmarks and the fleet simulator; results/ holds their JSON output."""
