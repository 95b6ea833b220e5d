"""The batch layer: the durable play matrix, periodic full ALS retrains, versioned publish and cleanup."""
