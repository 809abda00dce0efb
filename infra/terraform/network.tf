# The tasks' security group: in, only the API port from what the operator lists; out, only the
# brokers, Postgres and Redis inside the VPC, and the delivery ports (webhooks, Slack, SMTP) anywhere.

resource "aws_security_group" "tasks" {
  name        = "${var.name}-tasks"
  description = "alerting-app ECS tasks"
  vpc_id      = var.vpc_id
}

resource "aws_vpc_security_group_ingress_rule" "api_from_cidr" {
  for_each = toset(var.api_ingress_cidr_blocks)

  security_group_id = aws_security_group.tasks.id
  description       = "REST API, health and metrics from ${each.value}"
  ip_protocol       = "tcp"
  from_port         = var.web_port
  to_port           = var.web_port
  cidr_ipv4         = each.value
}

resource "aws_vpc_security_group_ingress_rule" "api_from_security_group" {
  for_each = toset(var.api_ingress_security_group_ids)

  security_group_id            = aws_security_group.tasks.id
  description                  = "REST API, health and metrics from ${each.value}"
  ip_protocol                  = "tcp"
  from_port                    = var.web_port
  to_port                      = var.web_port
  referenced_security_group_id = each.value
}

locals {
  # Services inside the VPC: port => what it is, for the rule descriptions.
  vpc_egress_ports = merge(
    { for port in var.kafka_ports : tostring(port) => "Kafka (MSK)" },
    { (tostring(var.postgres_port)) = "Postgres (RDS)" },
    { (tostring(var.redis_port)) = "Redis (ElastiCache)" },
  )
}

resource "aws_vpc_security_group_egress_rule" "vpc_services" {
  for_each = local.vpc_egress_ports

  security_group_id = aws_security_group.tasks.id
  description       = "${each.value} inside the VPC"
  ip_protocol       = "tcp"
  from_port         = tonumber(each.key)
  to_port           = tonumber(each.key)
  cidr_ipv4         = data.aws_vpc.selected.cidr_block
}

resource "aws_vpc_security_group_egress_rule" "delivery" {
  for_each = toset([for port in var.webhook_egress_ports : tostring(port)])

  security_group_id = aws_security_group.tasks.id
  description       = "Webhook, Slack and SMTP deliveries and AWS APIs on port ${each.value}"
  ip_protocol       = "tcp"
  from_port         = tonumber(each.value)
  to_port           = tonumber(each.value)
  cidr_ipv4         = "0.0.0.0/0"
}
