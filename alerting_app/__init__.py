"""alerting-app: multi-tenant alert routing on Faust."""
