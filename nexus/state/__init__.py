"""What must outlive the process (month-to-date spend), behind one small store interface."""
