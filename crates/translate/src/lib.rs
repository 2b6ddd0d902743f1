//! Pure translation: SMI hub objects → desired Consul state → commands.
