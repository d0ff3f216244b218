"""Whether the stored files, the rows and the vectors agree, and repairs of what safely can be."""
