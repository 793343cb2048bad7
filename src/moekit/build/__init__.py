"""Building MoEs from dense models: upcycling (`upcycle`)."""
